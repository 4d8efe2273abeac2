"""Knowledge distillation: train on the labels blended with trained teachers' probabilities.

Hinton et al. 2015, "Distilling the Knowledge in a Neural Network". A run with `teachers` (rvf
run folders) trains against the soft target

    (1 - distill_weight) * label  +  distill_weight * mean of the teachers' P(class | batch image)

where `label` is the one-hot label, label-smoothed as `label_smoothing` says (or MixUp/CutMix's
mixed label). Cross-entropy against that blend is (1 - w) CE(label) + w CE(teachers), and the
second term is the KL divergence to the teachers up to a constant: Hinton's loss at temperature
1. A higher temperature would soften a teacher's probabilities; with two classes and teachers
that were themselves trained with label smoothing they are soft already, and a single blended
target keeps the step one cross-entropy (so it runs unchanged as a CUDA graph).

Why it can help: several runs of one recipe average to a better detector than any of them
(scripts/ensemble.py), and serving that average costs one forward per member. Distilling the
average into one network keeps its price at one forward; the teachers' probabilities also tell
the student which faces are hard, which a hard label does not. Measured on rvf10k at 64 px it
did not pay (docs/experiments.md, session 27): teachers trained on the student's own images are
right on every one of them, so there they add little to the labels.

The teachers score the batch exactly as the student sees it (flipped, mixed), on the training
device, without gradients, under the run's mixed precision. Rules, each checked before any
data is decoded, with an error naming the teacher at fault:
- the same input size as the student (the batch is built once, for the student);
- the same holdout slice (`split_seed`, `holdout`, `subset`): a teacher that trained on the
  student's holdout images would carry them into the student, and the holdout would no longer
  pick epochs and calibrate the threshold on unseen faces;
- the same classes (logit 0 = fake).
A teacher normalised differently gets the batch re-normalised to its own mean and std.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rvf.config import ConfigError, TrainConfig

__all__ = ["Teachers", "load_teachers", "distill_targets"]


class Teachers(nn.Module):
    """Trained models whose mean probability is the distillation target.

    Args:
        models: classifiers returning logits (B, C), each in eval mode.
        norms: per model, None when it reads the student's normalisation, else the
            (scale, shift) that maps a student-normalised batch to its own: x * scale + shift.
    """

    def __init__(self, models: list[nn.Module], norms: list[tuple[torch.Tensor, torch.Tensor] | None]):
        super().__init__()
        self.models = nn.ModuleList(models).eval().requires_grad_(False)
        self.norms = norms

    def train(self, mode: bool = True) -> "Teachers":
        return super().train(False)  # BatchNorm and dropout stay as trained whatever the caller does

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean probability over the teachers, float32 (B, C)."""
        return torch.stack([model(x if norm is None else x * norm[0] + norm[1]).float().softmax(1)
                            for model, norm in zip(self.models, self.norms)]).mean(0)


def _renormalise(student, teacher, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) taking a batch normalised with `student`'s mean/std to `teacher`'s; None if equal."""
    if tuple(student.mean) == tuple(teacher.mean) and tuple(student.std) == tuple(teacher.std):
        return None
    s_mean, s_std, t_mean, t_std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                                    for v in (student.mean, student.std, teacher.mean, teacher.std))
    # x_t = (x_s * s_std + s_mean - t_mean) / t_std
    return s_std / t_std, (s_mean - t_mean) / t_std


def load_teachers(cfg, data_cfg, classes, device, channels_last: bool = False) -> Teachers | None:
    """The run's teachers (`cfg.teachers`), checked against the student; None when there are none.

    Raises:
        ConfigError: a teacher at another input size, holdout slice or class order, or a
            `distill_weight` of 0 with teachers (nothing would be distilled).
        CheckpointError: a teacher folder that is not a readable rvf checkpoint (names the file).
    """
    from rvf.checkpoint import CheckpointError, load_pretrained

    if not cfg.teachers:
        return None
    if not cfg.distill_weight:
        raise ConfigError(f"teachers are set ({len(cfg.teachers)}) but distill_weight is 0: nothing would be "
                          "distilled (e.g. distill_weight: 0.5)")
    student_slice = (cfg.resolved_split_seed, cfg.holdout, cfg.subset)
    models, norms = [], []
    for entry in cfg.teachers:
        path = Path(entry)
        name = str(path)
        try:
            model, meta, t_data = load_pretrained(path, device)
        except CheckpointError as e:  # "checkpoint folder X does not exist" alone does not say which key named X
            raise CheckpointError(f"teacher {name} (the teachers key): {e}") from None
        if list(meta.get("classes", ["fake", "real"])) != list(classes):
            raise ConfigError(f"teacher {name}: classes {meta.get('classes')}, the student's are {list(classes)}")
        if t_data.image_size != data_cfg.image_size:
            raise ConfigError(f"teacher {name} reads {t_data.image_size} px images and the student "
                              f"{data_cfg.image_size} px: a teacher scores the student's own batch, so the sizes must "
                              "match")
        t_cfg = meta.get("config")
        if t_cfg is None:
            raise ConfigError(f"teacher {name}/model.json has no training config: cannot tell which images it "
                              "held out (a teacher must hold out the student's slice)")
        t_run = TrainConfig().replace(source=f"{name}/model.json", **t_cfg)
        t_slice = (t_run.resolved_split_seed, t_run.holdout, t_run.subset)
        if cfg.holdout and t_slice != student_slice:  # no holdout: nothing is selected or calibrated
            raise ConfigError(
                f"teacher {name} held out another slice of train (split_seed {t_slice[0]}, holdout {t_slice[1]}, "
                f"subset {t_slice[2]}) than this run (split_seed {student_slice[0]}, holdout {student_slice[1]}, "
                f"subset {student_slice[2]}): it may have trained on this run's holdout images. "
                f"Set split_seed: {t_slice[0]} (and holdout/subset) to match it")
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        models.append(model)
        norms.append(_renormalise(data_cfg, t_data, device))
    return Teachers(models, norms)


def distill_targets(targets: torch.Tensor, teacher_probs: torch.Tensor, weight: float, num_classes: int,
                    smoothing: float = 0.0) -> torch.Tensor:
    """Blend the labels with the teachers' probabilities: (1 - weight) * label + weight * teachers.

    Args:
        targets: class indices (B,) or soft targets (B, C) (MixUp's, smoothing included).
        teacher_probs: (B, C), rows summing to 1.
        weight: the teachers' share, in [0, 1].
        num_classes: C.
        smoothing: label smoothing applied to class-index targets (soft ones carry their own).

    Returns:
        float32 (B, C) soft targets, rows summing to 1.
    """
    if targets.ndim == 1:
        from timm.data.mixup import mixup_target

        targets = mixup_target(targets, num_classes, lam=1.0, smoothing=smoothing)  # smoothed one-hot
    return (1.0 - weight) * targets.float() + weight * teacher_probs.float()
