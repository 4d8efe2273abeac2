"""Compare finished runs: a Markdown leaderboard and one comparison plot."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["SEED_ACCURACY", "collect_runs", "write_leaderboard"]

# The seed project's valid-split accuracy (%) at 64x64, Adam 1e-4, batch 64 (best of its two
# published runs), for the "seed" column.
SEED_ACCURACY = {"lenet": 76.1, "alexnet": 78.6, "inception_v1": 77.1, "vgg16": 50.0,
                 "resnet50": 75.8, "alexnet_bn": 72.6, "vgg16_bn": 85.7}


def collect_runs(run_dirs) -> list[dict]:
    """Read `metrics.json` of each run folder that has one, best valid accuracy first."""
    rows = []
    for d in map(Path, run_dirs):
        f = d / "metrics.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text())
        v = m["valid"]
        rows.append({"run": d.name, "path": str(d), "model": m["model"], "params": m.get("params"),
                     "macs": m.get("macs"), "image_size": m.get("image_size"), "accuracy": v["accuracy"],
                     "roc_auc": v["roc_auc"], "ap": v["average_precision"], "best_epoch": m["best_epoch"],
                     "epochs": m["epochs"], "train_seconds": m["train_seconds"], "device": m.get("device", "")})
    return sorted(rows, key=lambda r: -(r["accuracy"] or 0))


def _fmt_count(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def write_leaderboard(rows: list[dict], out_dir: str | Path, title: str = "rvf10k leaderboard") -> Path:
    """Write `leaderboard.md` and `leaderboard.png` into `out_dir`; return the Markdown path."""
    from rvf.reports import _plt, _save
    from rvf.utils import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "",
             "Valid split (3,000 images on the full rvf10k), best epoch chosen on the holdout slice of train.", "",
             "| # | model | run | size | params | MACs | accuracy % | seed % | ROC AUC | AP | best epoch | train time | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        seed = SEED_ACCURACY.get(r["model"])
        lines.append(
            f"| {i} | `{r['model']}` | {r['run']} | {r['image_size']} | {_fmt_count(r['params'])} | {_fmt_count(r['macs'])} "
            f"| {100 * r['accuracy']:.2f} | {seed if seed is not None else '-'} | {r['roc_auc']:.4f} | {r['ap']:.4f} "
            f"| {r['best_epoch']}/{r['epochs']} | {r['train_seconds'] / 60:.1f} min | {r['device']} |")
    md = out_dir / "leaderboard.md"
    atomic_write_text(md, "\n".join(lines) + "\n")

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 3.8))
    names = [r["run"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [100 * r["accuracy"] for r in rows], 0.4, label="rvf accuracy")
    ax.bar([i + 0.2 for i in x], [SEED_ACCURACY.get(r["model"], 0) for r in rows], 0.4, label="seed accuracy")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("valid accuracy (%)")
    ax.set_ylim(40, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    _save(fig, out_dir / "leaderboard.png")
    return md
