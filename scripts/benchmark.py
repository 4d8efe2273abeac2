"""Benchmark rvf's training path against the plain loop, on the same data, model and steps.

    python scripts/benchmark.py --data-dir ROOT --model lenet
    python scripts/benchmark.py --data-dir ROOT --model alexnet --repeats 2 --scaling 0
    python scripts/benchmark.py --synthetic 7000 --model lenet --device cuda   # no data needed

Times, in one process and one run (so machine noise hits both alike):
1. baseline: the seed's loop: torchvision ImageFolder + Resize + ToTensor, DataLoader with
   num_workers = cores, fp32, decode every image every epoch;
2. rvf: the decode-once uint8 cache (memory-mapped; on a GPU the whole split resident on the
   device, as `train()` does by default there), augmentation and normalisation on the device,
   rvf's optimizer (torch's fused kernel), bf16 autocast where the device does bf16 in
   hardware (as training's default `mixed_precision: auto`), no per-step host sync.
For each: training images/s (median of --repeats epochs after a warm-up epoch), data-only
images/s, the ratio, the one-time cache build, a projected 20-epoch run (cache build
included), peak RSS, inference throughput and single-image latency, and how rvf's epoch
time scales with dataset size (least-squares fit). Writes JSON and a Markdown table.
"""

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rvf.cli import make_folders, non_negative_int, output_dir, positive_int, stdout_reader_may_leave  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="rvf10k root (either layout)")
    parser.add_argument("--synthetic", type=non_negative_int, default=0, metavar="N",
                        help="use N random 256px images instead of --data-dir (e.g. on a machine without the data)")
    parser.add_argument("--synthetic-dir", type=Path, default=None,
                        help="write the --synthetic images here (train N, valid 3N/7, as rvf10k) and keep them, "
                             "e.g. to train on them next")
    parser.add_argument("--model", default="lenet", help="model name, as in configs (default: lenet)")
    parser.add_argument("--image-size", type=positive_int, default=64, help="default: 64")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="default: 64")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed epochs per variant, after one warm-up epoch; the median is reported (default: 3)")
    parser.add_argument("--max-steps", type=non_negative_int, default=0,
                        help="time only this many steps per epoch, the first untimed, and scale to the whole "
                             "split (0: full epochs; else at least 2)")
    parser.add_argument("--scaling", type=int, default=1, choices=[0, 1],
                        help="1: also time rvf epochs at 1/7, 1/2 and all of train (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                        help="rvf path only (the plain loop is fp32); auto: bf16 where the device does it "
                             "in hardware, as training decides")
    parser.add_argument("--channels-last", type=int, default=1,
                        help="rvf path: 1 = NHWC model and batches (as in training)")
    parser.add_argument("--device-data", choices=["auto", "on", "off"], default="auto",
                        help="rvf path: keep the uint8 split on the device (auto: as training decides)")
    parser.add_argument("--fused-optimizer", type=int, default=1,
                        help="rvf path: 1 = torch's fused Adam (as in training)")
    parser.add_argument("--cuda-graph", type=int, default=1,
                        help="on a CUDA device, also time rvf's step captured as a CUDA graph (rvf.step; "
                             "training's cuda_graph option): 1 = yes")
    parser.add_argument("--skip-baseline", action="store_true", help="time rvf's path only, not the plain loop")
    parser.add_argument("--out", type=output_dir, default=Path("benchmarks/results"),
                        help="folder for MODEL-SIZEpx-DEVICE.json and .md (default: benchmarks/results, "
                             "where the README's figures come from)")
    return parser


def _synthetic_folder(root: Path, n: int) -> Path:
    """Write random 256px JPEGs, rvf10k's shape and split ratio, into root/{train,valid}/{fake,real}:
    n train and 3n/7 valid images (for machines the real data cannot reach)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("valid", max(2, 3 * n // 7))):
        for i in range(count):
            d = root / split / ("fake", "real")[i % 2]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return root


def time_epochs(step_fn, loader, repeats: int, max_steps: int) -> tuple[float, int]:
    """Run one warm-up epoch, then `repeats` timed ones; return (median seconds, images timed).

    With `max_steps` the clock starts after each epoch's first step: a short window would
    otherwise carry the epoch's fixed start (the plain loop's DataLoader workers spawned, its
    first batch fetched), which `report` would then scale up to the whole epoch.
    """
    times, n_img = [], 0
    for r in range(repeats + 1):
        n = 0
        if hasattr(loader, "set_epoch"):  # DeviceLoader: a fresh permutation per epoch, as in training
            loader.set_epoch(r)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if max_steps and i >= max_steps:
                break
            step_fn(x, y)
            if max_steps and i == 0:
                step_fn.sync()
                t0 = time.perf_counter()
                continue
            n += len(y)
        step_fn.sync()
        if r > 0:
            times.append(time.perf_counter() - t0)
        n_img = n
    return statistics.median(times), n_img


class Step:
    """One optimizer step of the model on a batch; `data_only` just touches the batch."""

    def __init__(self, model, transform, device, data_only=False, autocast_dtype=None, channels_last=False,
                 fused=False, capturable=False):
        import torch

        if channels_last:  # weights and batches both NHWC, as train() does
            model = model.to(memory_format=torch.channels_last)
        self.torch, self.model, self.transform, self.device = torch, model, transform, device
        self.data_only, self.autocast_dtype, self.channels_last = data_only, autocast_dtype, channels_last
        # The baseline's optimizer is torch's default Adam; rvf's is what `train()` builds.
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None, capturable=capturable)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.acc = torch.zeros((), device=device)

    def __call__(self, x, y):
        torch = self.torch
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        x = self.transform(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.data_only:
            self.acc += x.float().mean()
            return
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.acc += loss.detach()

    def sync(self):
        self.acc.item()  # one host sync per epoch: the device has finished the epoch's work


class RvfStep(Step):
    """rvf's own training step (`rvf.step`: what `train()` runs), eager or as a CUDA graph."""

    def __init__(self, model, transform, device, autocast_dtype=None, channels_last=False, fused=False,
                 cuda_graph=False):
        import torch

        from rvf.step import build_train_step

        super().__init__(model, transform, device, autocast_dtype=autocast_dtype, channels_last=channels_last,
                         fused=fused, capturable=cuda_graph)
        # Training gets autocast from Accelerate; here the step opens it itself. Its cast
        # cache must be off under a graph (see rvf.step).
        autocast = None
        if autocast_dtype is not None:
            def autocast():
                return torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=not cuda_graph)
        self.step = build_train_step(self.model, self.loss_fn, self.opt, cuda_graph=cuda_graph, autocast=autocast)

    def __call__(self, x, y):
        torch = self.torch
        x = self.transform(x.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, _ = self.step(x, y.to(self.device, non_blocking=True))
        self.acc += loss


def main(args) -> int:
    import numpy as np
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    from rvf.data import (
        RVF10K,
        DeviceLoader,
        build_cache,
        build_train_transform,
        collate_batch,
        load_image,
        resolve_data_config,
        use_device_data,
    )
    from rvf.data.transforms import build_eval_transform
    from rvf.inference import resolve_device
    from rvf.models import create_model
    from rvf.utils import PeakSampler, device_name, resolve_mixed_precision, tree_rss

    if not args.data_dir and not args.synthetic:
        print("error: pass --data-dir ROOT or --synthetic N", file=sys.stderr)
        return 2
    if args.max_steps == 1 or (args.max_steps and args.scaling):
        print("error: --max-steps takes 0 or at least 2 (each epoch's first step is not timed), "
              "and --scaling 0 (the scaling fit times whole epochs)", file=sys.stderr)
        return 2
    if args.data_dir and args.synthetic:
        print("error: --data-dir and --synthetic both choose the data; pass one", file=sys.stderr)
        return 2
    if args.synthetic_dir and not args.synthetic:
        print("error: --synthetic-dir is where --synthetic N writes its images; pass --synthetic N too",
              file=sys.stderr)
        return 2
    if error := make_folders(args.out):  # before minutes of timing
        print(error, file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # The decode cache (1.4 GB at 256 px) and synthetic data live here until the process ends.
    tmp = Path(tempfile.mkdtemp(prefix="rvf-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    data_dir = args.data_dir or _synthetic_folder(args.synthetic_dir or tmp / "data", args.synthetic)
    train = RVF10K(data_dir, "train")
    split_dir = Path(train.samples[0][0]).parents[1]  # ROOT[/rvf10k]/train, for ImageFolder
    res = {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
           "device": device_name(device),
           "cores": cores, "torch": torch.__version__, "images": len(train), "data": str(data_dir),
           "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]])}

    def fresh_model():
        torch.manual_seed(0)
        return create_model(args.model).to(device)

    raw, per_image = {}, {}  # unrounded seconds for the ratios (a tiny epoch rounds to 0.000)

    def report(key, seconds, n):
        # --max-steps times part of an epoch: scale it to the whole split at the measured rate, so
        # epoch times and the 20-epoch projection mean what they say (the ratios are per image anyway).
        epoch = seconds * len(train) / n if args.max_steps else seconds
        raw[key], per_image[key] = epoch, seconds / n
        res[key] = {"epoch_seconds": round(epoch, 4), "images_per_second": round(n / seconds, 1), "images": n}
        if args.max_steps:
            res[key]["timed_seconds"] = round(seconds, 6)
        print(f"{key:>22}: {epoch:7.2f} s/epoch  {n / seconds:9.1f} img/s"
              + (f"  ({n} images timed in {seconds:.2f} s)" if args.max_steps else ""), flush=True)

    # 1) baseline: the seed's loop
    if not args.skip_baseline:
        tf = T.Compose([T.Resize((args.image_size, args.image_size)), T.ToTensor()])
        base_ds = torchvision.datasets.ImageFolder(str(split_dir), transform=tf)
        base_loader = DataLoader(base_ds, batch_size=args.batch_size, shuffle=True, num_workers=cores,
                                 pin_memory=device.type == "cuda")
        with PeakSampler(tree_rss) as mem:
            report("baseline_data_only", *time_epochs(Step(fresh_model(), torch.nn.Identity(), device, data_only=True),
                                                      base_loader, args.repeats, args.max_steps))
            report("baseline_train", *time_epochs(Step(fresh_model(), torch.nn.Identity(), device), base_loader,
                                                  args.repeats, args.max_steps))
        res["baseline_peak_rss_mb"] = round(mem.peak / 2**20, 1)

    # 2) rvf: decode once (cold, timed), then train from the memory map
    model = fresh_model()
    data_cfg = resolve_data_config(model, image_size=args.image_size)
    t0 = time.perf_counter()
    cached = build_cache(train.samples, args.image_size, cache_dir=tmp / "cache", name="bench", progress=False)
    res["cache_build_seconds"] = round(time.perf_counter() - t0, 2)
    res["cache_mb"] = round(cached.nbytes / 2**20, 1)
    print(f"{'cache build':>22}: {res['cache_build_seconds']:7.2f} s for {len(cached)} images "
          f"({res['cache_mb']} MB)", flush=True)
    train_tf = build_train_transform(data_cfg, hflip=0.5).to(device)
    precision = resolve_mixed_precision(args.mixed_precision, device)
    autocast = torch.bfloat16 if precision == "bf16" else None
    res["rvf_mixed_precision"] = precision
    device_data = use_device_data({"on": True, "off": False, "auto": None}[args.device_data], device, cached.nbytes)
    res["rvf_device_data"], res["rvf_fused_optimizer"] = device_data, bool(args.fused_optimizer)
    if device_data:
        rvf_loader = DeviceLoader(cached, args.batch_size, device, drop_last=False)
    else:
        rvf_loader = DataLoader(cached, batch_size=args.batch_size, shuffle=True, collate_fn=collate_batch,
                                pin_memory=device.type == "cuda")
    with PeakSampler(tree_rss) as mem:
        report("rvf_data_only", *time_epochs(Step(model, train_tf, device, data_only=True), rvf_loader,
                                             args.repeats, args.max_steps))
        report("rvf_train", *time_epochs(RvfStep(fresh_model(), train_tf, device, autocast_dtype=autocast,
                                                 channels_last=args.channels_last, fused=args.fused_optimizer),
                                         rvf_loader, args.repeats, args.max_steps))
    res["rvf_peak_rss_mb"] = round(mem.peak / 2**20, 1)
    if args.cuda_graph and device.type == "cuda":
        # A graph replays one batch shape: drop the last incomplete batch, as training does.
        graph_loader = DeviceLoader(cached, args.batch_size, device) if device_data else DataLoader(
            cached, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate_batch,
            pin_memory=True)
        report("rvf_graph_train", *time_epochs(RvfStep(fresh_model(), train_tf, device, autocast_dtype=autocast,
                                                       channels_last=args.channels_last,
                                                       fused=args.fused_optimizer, cuda_graph=True),
                                               graph_loader, args.repeats, args.max_steps))

    if "baseline_train" in res:
        b, r = raw["baseline_train"], raw["rvf_train"]
        res["speedup_epoch"] = round(b / r, 2)
        res["speedup_data_only"] = round(raw["baseline_data_only"] / raw["rvf_data_only"], 2)
        res["projected_20_epochs_seconds"] = {"baseline": round(20 * b, 1),
                                              "rvf_incl_cache_build": round(20 * r + res["cache_build_seconds"], 1)}
        res["speedup_20_epochs_incl_cache"] = round(20 * b / (20 * r + res["cache_build_seconds"]), 2)
        if "rvf_graph_train" in raw:  # per image: the graph's epoch drops the last incomplete batch
            res["speedup_epoch_cuda_graph"] = round(per_image["baseline_train"] / per_image["rvf_graph_train"], 2)

    # 3) inference: throughput over the cache, and one JPEG end to end (decode -> logits)
    model = fresh_model().eval()
    eval_tf = build_eval_transform(data_cfg).to(device)
    with torch.no_grad():
        x, _ = cached.__getitems__(list(range(min(256, len(cached)))))
        x = x.to(device)
        for _ in range(2):
            model(eval_tf(x))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            model(eval_tf(x)).float().sum().item()
            ts.append(time.perf_counter() - t0)
        res["inference_images_per_second"] = round(len(x) / statistics.median(ts), 1)
        path = train.samples[0][0]
        lat = []
        for _ in range(30):
            t0 = time.perf_counter()
            one = load_image(path, data_cfg.image_size, data_cfg.interpolation).to(device)
            model(eval_tf(one)).softmax(1)[0, 0].item()
            lat.append(time.perf_counter() - t0)
        res["single_image_latency_ms"] = round(1000 * statistics.median(lat[5:]), 2)
    print(f"{'inference':>22}: {res['inference_images_per_second']} img/s (batch {len(x)}), "
          f"single JPEG {res['single_image_latency_ms']} ms", flush=True)

    # 4) scaling: rvf epoch time vs number of images
    if args.scaling:
        pts = []
        for frac in (1 / 7, 1 / 2, 1.0):
            n = max(args.batch_size, int(len(cached) * frac))
            part = cached.subset(np.random.default_rng(0).permutation(len(cached))[:n])
            loader = DataLoader(part, batch_size=args.batch_size, shuffle=True, collate_fn=collate_batch)
            step = RvfStep(fresh_model(), train_tf, device, autocast_dtype=autocast,
                           channels_last=args.channels_last, fused=args.fused_optimizer)
            sec, n_img = time_epochs(step, loader, 2, 0)
            pts.append((n_img, sec))
            print(f"{'scaling':>22}: {n_img:6d} images -> {sec:6.2f} s", flush=True)
        xs, ys = np.array(pts, dtype=float).T
        slope, intercept = np.polyfit(xs, ys, 1)
        pred = slope * xs + intercept
        r2 = 1 - ((ys - pred) ** 2).sum() / max(((ys - ys.mean()) ** 2).sum(), 1e-12)
        res["scaling"] = {"points": [{"images": int(a), "seconds": round(b, 3)} for a, b in pts],
                          "fit": f"seconds = {slope * 1000:.4f} ms/img x N + {intercept:.3f} s",
                          "r2": round(float(r2), 5)}
        print(f"{'scaling fit':>22}: {res['scaling']['fit']}  (R^2 = {res['scaling']['r2']})", flush=True)

    stem = f"{args.model}-{args.image_size}px-{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (args.out / f"{stem}.md").write_text(_markdown(res))
    # Only here: a reader that leaves during the timings stops the benchmark, which is an error
    # (exit 1), not a quiet 0 with no result files.
    with stdout_reader_may_leave():  # `| head`
        print(_markdown(res))
    return 0


def _markdown(r: dict) -> str:
    rows = [f"**{r['model']} at {r['image_size']}px, batch {r['batch_size']}, on {r['device']}** "
            f"(torch {r['torch']}, {r['images']} train images)", "",
            "| path | train img/s | epoch (s) | data-only img/s | peak RSS (MB) |", "|---|---|---|---|---|"]
    for name in ("baseline", "rvf"):
        if f"{name}_train" in r:
            t, d = r[f"{name}_train"], r[f"{name}_data_only"]
            rows.append(f"| {name} | {t['images_per_second']} | {t['epoch_seconds']} | {d['images_per_second']} "
                        f"| {r[f'{name}_peak_rss_mb']} |")
    if "rvf_graph_train" in r:
        t = r["rvf_graph_train"]
        rows.append(f"| rvf, CUDA graph | {t['images_per_second']} | {t['epoch_seconds']} | | |")
    rows.append("")
    if "timed_seconds" in r.get("rvf_train", {}):
        rows.append(f"- epoch times: {r['rvf_train']['images']} images timed per epoch (`--max-steps`), "
                    f"scaled to the {r['images']}-image split at the measured rate")
    if "speedup_epoch" in r:
        rows.append(f"- speed-up per epoch (warm cache): **{r['speedup_epoch']}x**; "
                    f"data only: {r['speedup_data_only']}x")
        projected = r["projected_20_epochs_seconds"]
        rows.append(f"- 20 epochs incl. the one-time cache build: **{r['speedup_20_epochs_incl_cache']}x** "
                    f"({projected['baseline']} s vs {projected['rvf_incl_cache_build']} s)")
    if "speedup_epoch_cuda_graph" in r:
        rows.append(f"- speed-up per image with the step as a CUDA graph: **{r['speedup_epoch_cuda_graph']}x**")
    rows.append(f"- rvf path: split resident on the device: {r.get('rvf_device_data', False)}; "
                f"fused optimizer: {r.get('rvf_fused_optimizer', False)}; "
                f"precision: {r.get('rvf_mixed_precision', 'no')} (baseline: fp32)")
    rows.append(f"- cache build: {r['cache_build_seconds']} s for {r['cache_mb']} MB")
    rows.append(f"- inference: {r['inference_images_per_second']} img/s; "
                f"one JPEG end to end: {r['single_image_latency_ms']} ms")
    if "scaling" in r:
        pts = ", ".join(f"{p['images']} img: {p['seconds']} s" for p in r["scaling"]["points"])
        rows.append(f"- scaling: {pts}; fit {r['scaling']['fit']}, R^2 {r['scaling']['r2']}")
    rows.append(f"- command: `{r['command']}`")
    return "\n".join(rows) + "\n"


def cli(args) -> int:
    """`main`, with bad data, model names and devices as one line instead of a traceback."""
    from rvf.data import DatasetError

    try:
        return main(args)
    except (DatasetError, ValueError) as e:  # ValueError: an unknown model, or cuda without a GPU
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli(get_args_parser().parse_args()))
