"""rvf: train, compare and serve detectors of real vs GAN-generated faces.

Subpackages are imported lazily by their users so that `import rvf` stays cheap and the
training path never needs the web stack (Flask) or a tracker (wandb) installed.
"""

__version__ = "0.1.0"

CLASSES = ("fake", "real")  # label 0 = fake, 1 = real: Kaggle's CSV and the seed agree
