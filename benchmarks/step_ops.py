"""Count the ATen operations one training step dispatches, per model (no GPU needed).

On a GPU each of these is at least one kernel launch that the host has to issue. When the
arithmetic per step is small (64 px images, batch 64) the host's launch rate, not the GPU,
sets the step time, and this count predicts it: dividing a measured step time by it gives
the host's cost per operation. That is the case for capturing the step as a CUDA graph
(`cuda_graph: true`, rvf.step), which replays all of them with one launch.

    python benchmarks/step_ops.py                       # the seven seed configs
    python benchmarks/step_ops.py --configs configs/lenet.yaml --out ops.json
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEED_CONFIGS = [f"configs/{m}.yaml" for m in ("lenet", "alexnet", "alexnet_bn", "vgg16", "vgg16_bn", "resnet50",
                                              "inception_v1")]


def count_step_ops(cfg, batch_size: int = 8) -> int:
    """ATen operations in one bf16-autocast training step (forward, loss, backward, optimizer)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from rvf.models import create_model
    from rvf.step import TrainStep
    from rvf.train import build_optimizer

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=2, **cfg.model_args).to(memory_format=torch.channels_last)
    size = cfg.image_size or 64
    step = TrainStep(model, torch.nn.CrossEntropyLoss(), build_optimizer(cfg, model), grad_clip=cfg.grad_clip,
                     aux_weight=cfg.aux_weight, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    x = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,))
    step(x, y)  # the optimizer creates its state on the first step: count a steady-state one
    with Count() as counter:
        step(x, y)
    return counter.n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=SEED_CONFIGS, help="training configs (YAML)")
    parser.add_argument("--out", type=Path, help="also write {config: ops} as JSON here")
    args = parser.parse_args(argv)
    from rvf.config import ConfigError, load_config

    try:  # every config before any counting
        configs = {path: load_config(path) for path in args.configs}
    except ConfigError as e:
        parser.error(str(e))
    counts = {}
    for path, cfg in configs.items():
        counts[Path(path).stem] = n = count_step_ops(cfg)
        print(f"{Path(path).stem:>14}: {n:5d} ATen ops per training step", flush=True)
    if args.out:
        args.out.write_text(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
