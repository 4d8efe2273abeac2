"""Watch the first steps of training at several learning rates: does the network stay alive?

    python scripts/probe_training.py --data-dir ROOT --model vgg16 --lrs 1e-4 1e-5 --steps 60

For "my model never leaves 50 %": trains a fresh copy of the model (same seed, same batches)
per learning rate with Adam, and every `--every` steps prints the training loss, the fraction
of dead units (ReLU outputs that are zero for every image in the batch) in the last conv
layer and in the head, and the spread of the logits. A network whose last conv layer goes
100 % dead cannot learn again: its gradients are zero from then on. Writes JSON too.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rvf.cli import output_file, positive_float, positive_int  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="rvf10k root (either layout)")
    parser.add_argument("--model", default="vgg16",
                        help="model name, as in configs (default: vgg16, the seed's net that never learned)")
    parser.add_argument("--lrs", type=positive_float, nargs="+", default=[1e-4, 1e-5],
                        help="Adam learning rates, one fresh copy of the model each (default: 1e-4 1e-5)")
    parser.add_argument("--steps", type=positive_int, default=60, help="training steps per rate (default: 60)")
    parser.add_argument("--every", type=positive_int, default=10, help="print a row every this many steps "
                                                                       "(and at step 1; default: 10)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="default: 64")
    parser.add_argument("--image-size", type=positive_int, default=64, help="default: 64")
    parser.add_argument("--seed", type=int, default=42, help="weights and batch order (default: 42)")
    parser.add_argument("--out", type=output_file, default=None, help="JSON file for the traces")
    return parser


def cli(args) -> int:
    """`main`, with a bad data folder or model name as one line instead of a traceback."""
    from rvf.data import BadImageError, DatasetError

    try:
        return main(args)
    except (DatasetError, BadImageError, ValueError) as e:  # ValueError: an unknown model name
        print(f"error: {e}", file=sys.stderr)
        return 2


def probe(model, batches, lr: float, every: int) -> list[dict]:
    import torch
    from torch import nn

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    conv_relus = [r for r in relus if r in set(getattr(model, "features", nn.Sequential()).modules())]
    watch = {"last_conv": conv_relus[-1] if conv_relus else None, "head": relus[-1] if relus else None}
    dead = {}

    def hook(name):
        def fn(_module, _inp, out):  # out: (B, C, H, W) or (B, C); a unit is dead if 0 for all
            flat = out.detach().transpose(0, 1).reshape(out.shape[1], -1)
            dead[name] = float((flat.amax(1) <= 0).float().mean())
        return fn

    handles = [m.register_forward_hook(hook(k)) for k, m in watch.items() if m is not None]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    trace = []
    model.train()
    for step, (x, y) in enumerate(batches, 1):
        logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == 1:
            row = {"step": step, "loss": round(loss.item(), 4), "logit_std": round(logits.detach().std().item(), 4),
                   **{f"dead_{k}": round(v, 3) for k, v in dead.items()}}
            trace.append(row)
            print(f"lr {lr:g} | " + " | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    for h in handles:
        h.remove()
    return trace


def main(args) -> int:
    import numpy as np
    import torch

    from rvf.data import RVF10K, build_cache, build_eval_transform, resolve_data_config
    from rvf.models import create_model

    torch.manual_seed(args.seed)
    data_cfg = resolve_data_config(create_model(args.model), image_size=args.image_size)
    cached = build_cache(RVF10K(args.data_dir, "train").samples, data_cfg.image_size,
                         interpolation=data_cfg.interpolation, name="train")
    tf = build_eval_transform(data_cfg)
    order = np.random.default_rng(args.seed).permutation(len(cached))
    batches = []
    for s in range(args.steps):
        idx = order[(s * args.batch_size) % len(order):][:args.batch_size]
        x, y = cached.__getitems__(idx.tolist())
        batches.append((tf(x), y))
    traces = {}
    for lr in args.lrs:
        torch.manual_seed(args.seed)  # the same initial weights for every lr
        traces[str(lr)] = probe(create_model(args.model), batches, lr, args.every)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "image_size": data_cfg.image_size,
                                        "batch_size": args.batch_size, "traces": traces}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli(get_args_parser().parse_args()))
