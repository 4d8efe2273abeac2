"""fp32 vs bf16 autocast, one training step per model, on this machine's CPU or GPU.

Usage:
    python benchmarks/precision.py [--models lenet alexnet ...] [--image-size 64] [--batch-size 64]

For each model: a training step (forward, cross-entropy, backward, fused Adam) on a random
batch, channels_last as training does, timed alternately in fp32 and under bf16 autocast
(two rounds of each, so drift on a noisy machine hits both alike) after a warm-up step. It
prints the median step time of each and the ratio, and whether rvf's default
`mixed_precision: auto` picks bf16 here (`rvf.utils.has_native_bf16`). JSON goes to --out.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rvf.cli import positive_int  # noqa: E402
from rvf.models import create_model, list_models  # noqa: E402
from rvf.utils import device_name, has_native_bf16  # noqa: E402

# Big models get fewer timed steps: a VGG16 step is over a second on two CPU cores.
FEW_STEPS = {"vgg16", "vgg16_bn", "resnet50", "inception_v1"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="fp32 vs bf16 autocast per training step.", add_help=add_help)
    parser.add_argument("--models", nargs="+", default=list_models(), metavar="NAME",
                        help="rvf model names or timm:NAME (default: every rvf model)")
    parser.add_argument("--image-size", type=positive_int, default=64)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--steps", type=positive_int, default=8, help="timed steps per round (3 for the big models)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision-cpu.json"))
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_model(name).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), 1e-4, fused=True)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch_size,), device=device)
    steps = 3 if name in FEW_STEPS else args.steps
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _round in range(2):
        for mode in times:
            for i in range(steps + 1):  # step 0 of each round is a warm-up
                _sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                _sync(device)
                if i:
                    times[mode].append(time.perf_counter() - t0)
    fp32, bf16 = (statistics.median(times[m]) * 1e3 for m in ("fp32", "bf16"))
    return {"model": name, "fp32_ms": round(fp32, 1), "bf16_ms": round(bf16, 1), "speedup": round(fp32 / bf16, 2)}


def main(args) -> int:
    device = torch.device(args.device)
    res = {"device": device_name(device), "torch": torch.__version__, "native_bf16": has_native_bf16(device),
           "image_size": args.image_size, "batch_size": args.batch_size, "command": " ".join(sys.argv), "models": []}
    print(f"{res['device']}, torch {res['torch']}, native bf16: {res['native_bf16']} "
          f"(mixed_precision: auto picks {'bf16' if res['native_bf16'] else 'fp32'})", flush=True)
    for name in args.models:
        row = time_steps(name, args, device)
        res["models"].append(row)
        print(f"{name:>14}: fp32 {row['fp32_ms']:8.1f} ms   bf16 {row['bf16_ms']:8.1f} ms   {row['speedup']:.2f}x",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    for name in set(args.models) - set(list_models()):  # before any timing: a typo in the last name costs nothing
        try:
            create_model(name)
        except (ValueError, RuntimeError) as e:
            parser.error(f"--models {name}: {e}")
    sys.exit(main(args))
