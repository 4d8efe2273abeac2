"""Latency of `POST /api/predict` for one 256x256 JPEG, per model (random weights).

Usage:
    python benchmarks/api_latency.py [--models lenet alexnet resnet50] [--n 50] [--gradcam] [--threads 1]
                                     [--output benchmarks/results/api_latency-cpu.md]

For each model it saves a random-weight checkpoint at the model's own input size, builds the
app with `create_app`, warms up, then times `--n` requests through Flask's test client (the
whole request: multipart parsing, decode, resize, forward, JSON; no network). It prints
p50/p90/mean in milliseconds and the CPU or GPU it ran on, and with `--output` writes the same
table, headed by its command, to a Markdown file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

MINI_FAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "rvf10k-mini" / "rvf10k" / "valid" / "fake"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time POST /api/predict per model.", add_help=add_help)
    parser.add_argument("--models", nargs="+", default=["lenet", "alexnet", "resnet50"])
    parser.add_argument("--n", type=int, default=50, help="timed requests per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gradcam", action="store_true", help="ask for a Grad-CAM overlay too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", type=Path, help="also write the table, with the command, to this Markdown file")
    return parser


def sample_jpeg() -> tuple[bytes, str]:
    """One real 256x256 face from rvf10k-mini, or a generated 256x256 JPEG."""
    files = sorted(MINI_FAKE.glob("*.jpg")) if MINI_FAKE.is_dir() else []
    if files:
        return files[0].read_bytes(), files[0].name
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue(), "generated.jpg"


def main(args) -> int:
    import torch

    from rvf.checkpoint import save_pretrained
    from rvf.data.transforms import resolve_data_config
    from rvf.models import create_model
    from rvf.utils import device_name
    from rvf.web import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    data, name = sample_jpeg()
    query = "?gradcam=1" if args.gradcam else ""
    lines = [f"POST /api/predict{query}, one {name} ({len(data) / 1000:.0f} KB); {args.n} requests after "
             f"{args.warmup} warm-up; {device_name(args.device)}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}",
             "", "| model | input | p50 ms | p90 ms | mean ms |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for model_name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            model = create_model(model_name)
            data_cfg = resolve_data_config(model)
            save_pretrained(tmp, model, {"model_name": model_name, "model_args": {"num_classes": 2},
                                         "data_config": data_cfg.to_dict(), "classes": ["fake", "real"]})
            client = create_app({"MODEL_CHECKPOINT": tmp, "DEVICE": args.device,
                                 "TORCH_THREADS": args.threads}).test_client()
            times = []
            for i in range(args.warmup + args.n):
                t0 = time.perf_counter()
                r = client.post("/api/predict" + query, data={"image": (io.BytesIO(data), name)})
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    print(f"error: {model_name}: {r.status_code} {r.json}", file=sys.stderr)
                    return 1
                if i >= args.warmup:
                    times.append(dt * 1000)
        q = statistics.quantiles(times, n=10)
        lines.append(f"| {model_name} | {data_cfg.image_size} px | {statistics.median(times):.1f} | {q[8]:.1f} | "
                     f"{statistics.fmean(times):.1f} |")
        print(lines[-1], flush=True)
    if args.output:
        command = "python benchmarks/api_latency.py " + " ".join(sys.argv[1:])
        args.output.write_text(f"`{command}`\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
