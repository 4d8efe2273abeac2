"""Compare finished runs: a Markdown leaderboard and one comparison plot."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["SEED_ACCURACY", "PUBLISHED_FILES", "ResultsError", "collect_runs", "publish_run", "read_run_metrics",
           "readme_table", "unpublished_files", "update_readme", "write_leaderboard"]

# The seed project's valid-split accuracy (%) at 64x64, Adam 1e-4, batch 64 (best of its two
# published runs), for the "seed" column.
SEED_ACCURACY = {"lenet": 76.1, "alexnet": 78.6, "inception_v1": 77.1, "vgg16": 50.0,
                 "resnet50": 75.8, "alexnet_bn": 72.6, "vgg16_bn": 85.7}


class ResultsError(ValueError):
    """A run's metrics.json cannot go into the leaderboard; the message names the file."""


# What a training run's metrics.json holds and the tables need (an evaluate.py folder has no
# best epoch or training time: it is a score, not a run).
REQUIRED = ("model", "valid", "best_epoch", "epochs", "train_seconds")
REQUIRED_VALID = ("accuracy", "roc_auc", "average_precision")


def read_run_metrics(path: str | Path) -> dict:
    """Read and check a training run's `metrics.json`.

    Raises:
        ResultsError: naming the file, when it is not JSON or lacks what the tables show.
    """
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(m, dict) or not isinstance(m.get("valid"), dict):
        raise ResultsError(f"{path}: not a training run's metrics (no 'valid' section)")
    missing = [k for k in REQUIRED if k not in m] + [f"valid.{k}" for k in REQUIRED_VALID if k not in m["valid"]]
    if missing:
        hint = " (an evaluate.py output? publish the training run's folder)" if "split" in m else ""
        raise ResultsError(f"{path}: lacks {', '.join(missing)}{hint}")
    # The tables do sums with these (ROC AUC and AP may be null: a one-class split has none).
    values = {"valid.accuracy": m["valid"]["accuracy"], **{k: m[k] for k in ("best_epoch", "epochs", "train_seconds")}}
    not_numbers = [f"{k} {v!r}" for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if not_numbers:
        raise ResultsError(f"{path}: not a number: {', '.join(not_numbers)}")
    return m


def collect_runs(run_dirs) -> list[dict]:
    """Read `metrics.json` of each run folder that has one: best valid accuracy first, ties to the
    higher ROC AUC, then by name (so that ranks never depend on the order folders are listed)."""
    rows = []
    for d in map(Path, run_dirs):
        f = d / "metrics.json"
        if not f.is_file():
            continue
        m = read_run_metrics(f)
        v = m["valid"]
        holdout = (m.get("counts") or {}).get("holdout")
        rows.append({"run": d.name, "path": str(d), "model": m["model"], "params": m.get("params"),
                     "macs": m.get("macs"), "image_size": m.get("image_size"), "accuracy": v["accuracy"],
                     "roc_auc": v["roc_auc"], "ap": v["average_precision"], "best_epoch": m["best_epoch"],
                     "epochs": m["epochs"], "train_seconds": m["train_seconds"], "device": m.get("device", ""),
                     # A run without a holdout slice kept 0.5, calibrated on nothing.
                     "acc_at_threshold": v.get("accuracy_at_threshold") if holdout != 0 else None,
                     "eer": v.get("eer"), "holdout_images": holdout,
                     "torch": m.get("torch", ""), "num_processes": m.get("num_processes", 1),
                     "valid_images": (m.get("counts") or {}).get("valid")})
    return sorted(rows, key=lambda r: (-(r["accuracy"] or 0), -(r["roc_auc"] or 0), r["run"]))


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    """A number for a table cell, or "-" where there is none (null: e.g. ROC AUC of a one-class split)."""
    return "-" if x is None else f"{scale * x:{spec}}"


def _fmt_minutes(seconds: float) -> str:
    # A test-sized run under a minute reads "0.0 min" otherwise.
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


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
    # Say what was scored, from the runs themselves: a zoo on a small folder is not rvf10k's 3,000.
    sizes = sorted({r["valid_images"] for r in rows if r.get("valid_images")})
    scored = f" ({' / '.join(f'{n:,}' for n in sizes)} images)" if sizes else ""
    chosen = "best epoch chosen on the holdout slice of train"
    if any(r.get("holdout_images") == 0 for r in rows):
        chosen += " (a run without one, holdout 0, keeps its last epoch)"
    lines = [f"# {title}", "",
             f"Valid split{scored}, {chosen}.", "",
             "| # | model | run | size | params | MACs | accuracy % | seed % | ROC AUC | AP | best epoch "
             "| train time | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        seed = SEED_ACCURACY.get(r["model"])
        lines.append(
            f"| {i} | `{r['model']}` | {r['run']} | {r['image_size']} | {_fmt_count(r['params'])} "
            f"| {_fmt_count(r['macs'])} "
            f"| {100 * r['accuracy']:.2f} | {seed if seed is not None else '-'} | {_fmt(r['roc_auc'], '.4f')} "
            f"| {_fmt(r['ap'], '.4f')} "
            f"| {r['best_epoch']}/{r['epochs']} | {_fmt_minutes(r['train_seconds'])} | {r['device']} |")
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


# What a published run keeps: small text and PNG reports. Never the weights, the resume
# states, W&B folders or samples.png (it shows dataset faces).
PUBLISHED_FILES = ("metrics.json", "config.yaml", "classification_report.txt", "confusion_matrix.png", "curves.png",
                   "roc.png", "architecture.txt", "architecture.png", "robustness.json", "robustness.md",
                   "robustness.png")

README_START = "<!-- results:start (generated by scripts/publish_results.py; do not edit by hand) -->"
README_END = "<!-- results:end -->"


def unpublished_files(folder: str | Path) -> list[str]:
    """What `folder` (a published run) holds that no run publishes: put there by hand or by another tool."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.name not in PUBLISHED_FILES) if folder.is_dir() else []


def publish_run(run_dir: str | Path, results_root: str | Path,
                name: str | None = None) -> tuple[Path, list[str], list[str]]:
    """Make `results_root/<name>` hold a finished run's report files (`PUBLISHED_FILES`), robustness.*
    from the run folder or its robustness-valid/ (scripts/robustness.py's default output).

    The folder is replaced as a whole, so that it never mixes two trainings: report files the
    previous publication had and the run lacks (robustness.* that scripts/robustness.py
    --output-dir wrote there) are dropped, unless that publication is this same training (an
    equal metrics.json), whose reports they still are. The new folder is built beside the old
    one and swapped in, so a failure while copying leaves the old one whole.

    Returns:
        The folder, and the names of the previous publication's files dropped and kept.

    Raises:
        FileNotFoundError: the run has no metrics.json.
        FileExistsError: the folder holds files no run publishes (`unpublished_files`), which
            replacing it would delete.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.json; is the run finished?")
    dest = Path(results_root) / (name or run_dir.name)
    if foreign := unpublished_files(dest):
        raise FileExistsError(f"{dest}: holds {', '.join(foreign)}, which no run publishes; move it out first")
    # robustness.* from the run folder or, where scripts/robustness.py writes them by default, its
    # robustness-valid/ (the split the tables report); the three from one folder, never mixed.
    robustness = [f for f in PUBLISHED_FILES if f.startswith("robustness.")]
    robustness_dir = next((d for d in (run_dir, run_dir / "robustness-valid")
                           if any((d / f).is_file() for f in robustness)), run_dir)
    source = {f: (robustness_dir if f in robustness else run_dir) / f for f in PUBLISHED_FILES}
    new = [f for f in PUBLISHED_FILES if source[f].is_file()]
    extra = [f for f in PUBLISHED_FILES if (dest / f).is_file() and f not in new]
    try:
        same = json.loads((dest / "metrics.json").read_text()) == json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # nothing published yet, or a file no training wrote
        same = False
    kept, dropped = (extra, []) if same else ([], extra)
    # Hidden siblings (the rebuild skips them), named by process: a leftover of this pid is a killed publish.
    staged, retired = (dest.with_name(f".{dest.name}.{what}-{os.getpid()}") for what in ("publishing", "previous"))
    for leftover in (staged, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        for f in new:
            shutil.copy2(source[f], staged / f)
        for f in kept:
            shutil.copy2(dest / f, staged / f)
        if dest.exists():
            dest.rename(retired)
        try:
            staged.rename(dest)
        except BaseException:
            if retired.exists():
                retired.rename(dest)
            raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)
    return dest, dropped, kept


def readme_table(rows: list[dict]) -> str:
    """The README's results table: one row per published run, seed's number beside ours,
    with the config that reproduces it and the machine that produced it."""
    lines = ["| config | model | rvf accuracy | seed | vs seed | ROC AUC | AP | EER | acc. at calibrated threshold "
             "| best epoch | params | machine | train time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seed = SEED_ACCURACY.get(r["model"])
        machine = r["device"] + (f" x {r['num_processes']}" if r.get("num_processes", 1) > 1 else "")
        acc_t = _fmt(r.get("acc_at_threshold"), ".2f", 100) + (" %" if r.get("acc_at_threshold") is not None else "")
        acc = 100 * r["accuracy"]
        acc_s = f"**{acc:.2f} %**" if seed is None or acc >= seed else f"{acc:.2f} %"  # bold: the seed is beaten
        delta = f"{acc - seed:+.2f} pts" if seed is not None else "-"
        lines.append(
            f"| `configs/{r['run']}.yaml` | `{r['model']}` | {acc_s} "
            f"| {f'{seed} %' if seed is not None else '-'} | {delta} | {_fmt(r['roc_auc'], '.4f')} "
            f"| {_fmt(r['ap'], '.4f')} | {_fmt(r.get('eer'), '.3f')} "
            f"| {acc_t} "
            f"| {r['best_epoch']}/{r['epochs']} | {_fmt_count(r['params'])} | {machine}, torch {r.get('torch', '')} "
            f"| {_fmt_minutes(r['train_seconds'])} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: str | Path, rows: list[dict]) -> bool:
    """Replace the table between the README's results markers; return whether it changed."""
    readme = Path(readme)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no results markers ({README_START!r} ... {README_END!r})")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{readme_table(rows)}{README_END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text
