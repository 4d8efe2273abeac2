r"""Train flagship candidates over seeds on one holdout slice, pick one on that slice, score ensembles.

    python benchmarks/flagship_sweep.py --data-dir ROOT --out OUT --seeds 0 1 2 \
        --variants configs/flagship_alexnet_bn_grid512.yaml \
                   "configs/flagship_alexnet_bn_grid512.yaml downscale=0.5" \
                   configs/flagship_resnet18.yaml \
        --select --budget-s 480

A variant is one argument: a config, then `--set` overrides separated by spaces (JSON for a
mapping: 'model_args={"stem_stride":2}'). Every run holds out the same slice of train
(`split_seed`), so the seeds of a variant are also scored as one ensemble, and `--select` can
compare variants on that slice: it trains every variant on the first seed, then the other seeds
only for the variant with the best holdout accuracy (ties: the lower holdout loss). The valid
split never picks anything.

A device call has a hard time limit, and a run killed by it loses the summary too (session 19
lost an ensemble that way), so `--budget-s` skips any run or ensemble that is not expected to end
in time: a run is expected to take as long as the slowest finished run of its variant (of any
variant before the first has finished), an ensemble a twelfth of that per member (a guess:
scoring two splits once per member, not timed yet).

With runs of more than one variant, all of them are also scored as one ensemble (the models
err on different faces: at 128 px, AlexNet+BN 87.17 % and ResNet18 86.50 % made 88.73 %).

Writes OUT/flagship.md (one row per variant: holdout, valid mean +- std, ensemble) and
OUT/flagship.json (every run and ensemble), one log per run and ensemble; the run folders
(checkpoints) stay in --runs-root, out of OUT, so that OUT stays small enough to send back.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Variant:
    """A config and its overrides; `name` is a file-name-safe label for its runs and logs."""

    config: Path
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        label = ".".join([self.config.stem] + self.overrides)
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        try:
            config, *overrides = shlex.split(spec)
        except ValueError as e:  # an unclosed quote, or nothing at all
            raise argparse.ArgumentTypeError(f"variant {spec!r} is not 'CONFIG [KEY=VALUE ...]' ({e})") from None
        return cls(Path(config), overrides)


def check_variants(variants: list[Variant], common: list[str]) -> list[str]:
    """Every problem a variant would stop with, found before the first run starts."""
    from rvf.config import ConfigError, load_config, parse_override

    problems = []
    for v in variants:
        try:
            load_config(v.config, dict(parse_override(o) for o in common + v.overrides))
        except ConfigError as e:
            problems.append(f"variant {v.name!r}: {e}")
    names = [v.name for v in variants]
    problems += [f"variant {n!r} is given twice" for n in sorted({n for n in names if names.count(n) > 1})]
    return problems


class Budget:
    """Wall-clock seconds left for the sweep, and what each kind of job is expected to cost."""

    def __init__(self, seconds: float | None, clock=time.monotonic):
        self.seconds, self.clock, self.start = seconds, clock, clock()
        self.run_seconds: dict[str, float] = {}  # the slowest finished run of each variant

    def elapsed(self) -> float:
        return self.clock() - self.start

    def record(self, variant: str, seconds: float) -> None:
        self.run_seconds[variant] = max(seconds, self.run_seconds.get(variant, 0.0))

    def expected(self, variant: str | None = None) -> float:
        if variant in self.run_seconds:
            return self.run_seconds[variant]
        return max(self.run_seconds.values(), default=0.0)

    def allows(self, seconds: float) -> bool:
        return self.seconds is None or self.elapsed() + seconds <= self.seconds


def pick_best(results: dict[str, list[dict]]) -> str:
    """The variant whose first run scored best on the holdout slice: accuracy, then lower loss."""
    scored = {name: runs[0]["holdout"] for name, runs in results.items() if runs}
    if not scored:
        raise ValueError("no finished run to pick from")
    return max(scored, key=lambda n: (scored[n]["accuracy"], -scored[n]["loss"]))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict[str, list[dict]], ensembles: dict[str, dict]) -> tuple[dict, str]:
    """flagship.json's content and flagship.md's table from the finished runs and ensembles."""
    summary, rows = {}, []
    for name, runs in results.items():
        if not runs:
            continue
        acc = _mean_std([100 * r["valid"]["accuracy"] for r in runs])
        auc = _mean_std([r["valid"]["roc_auc"] for r in runs])
        ap = _mean_std([r["valid"]["average_precision"] for r in runs])
        hold = _mean_std([100 * r["holdout"]["accuracy"] for r in runs])
        ens = ensembles.get(name)
        summary[name] = {"runs": runs, "valid_accuracy_mean_std": acc, "valid_roc_auc_mean_std": auc,
                         "valid_ap_mean_std": ap, "holdout_accuracy_mean_std": hold, "ensemble": ens}
        ens_cell = f"{100 * ens['valid']['accuracy']:.2f} / {ens['valid']['roc_auc']:.4f}" if ens else "-"
        rows.append(f"| {name} | {', '.join(str(r['seed']) for r in runs)} | {hold[0]:.2f} | "
                    f"{acc[0]:.2f} ± {acc[1]:.2f} | {auc[0]:.4f} ± {auc[1]:.4f} | {ap[0]:.4f} ± {ap[1]:.4f} | "
                    f"{ens_cell} | {statistics.mean(r['train_seconds'] for r in runs):.0f} | {runs[0]['device']} |")
    header = ["| variant | seeds | holdout acc. % | valid acc. % | valid ROC AUC | valid AP | "
              "ensemble valid acc. % / AUC | train s/run | device |", "|---|---|---|---|---|---|---|---|---|"]
    return summary, "\n".join(header + rows) + "\n"


def _run_record(run_dir: Path, seed: int) -> dict:
    d = json.loads((run_dir / "metrics.json").read_text())
    keep = ("accuracy", "roc_auc", "average_precision", "accuracy_at_threshold", "loss", "eer")
    return {"run": run_dir.name, "seed": seed, "best_epoch": d["best_epoch"], "epochs": d["epochs"],
            "train_seconds": round(d["train_seconds"], 1), "device": d["device"],
            "cuda_graph": d.get("cuda_graph"), "holdout": {k: d["holdout"][k] for k in keep},
            "valid": {k: d["valid"][k] for k in keep}}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="dataset root, passed to every run")
    parser.add_argument("--variants", nargs="+", required=True, type=Variant.parse, metavar="'CONFIG [KEY=VALUE ...]'",
                        help="configs to train, each with its own overrides in the same argument")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: 0 1 2")
    parser.add_argument("--split-seed", type=int, default=42, help="the holdout slice every run shares (default 42)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run (before each variant's own)")
    parser.add_argument("--select", action="store_true",
                        help="every variant on the first seed, the other seeds only for the best on the holdout")
    parser.add_argument("--budget-s", type=float, help="skip what would not end within this many seconds")
    parser.add_argument("--out", type=Path, default=Path("flagship"), help="logs and summary (default: flagship/)")
    parser.add_argument("--runs-root", type=Path, default=Path("/tmp/rvf-flagship"),
                        help="run folders, checkpoints included (default: /tmp/rvf-flagship)")
    return parser


def main(args) -> int:
    variants = args.variants
    problems = check_variants(variants, args.overrides)
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    skipped, failed = [], []

    def train(v: Variant, seed: int) -> None:
        name = f"{v.name}_seed{seed}"
        if not budget.allows(budget.expected(v.name)):
            skipped.append(name)
            print(f"[sweep] {name}: skipped, {budget.expected(v.name):.0f} s expected and "
                  f"{args.budget_s - budget.elapsed():.0f} s left", flush=True)
            return
        run_dir = args.runs_root / name
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(v.config),
               "--data-dir", args.data_dir, "--output-dir", str(run_dir), "--seed", str(seed),
               "--set", f"split_seed={args.split_seed}", "--tracker", "none", "--overwrite"]
        for o in args.overrides + v.overrides:
            cmd += ["--set", o]
        start = time.monotonic()
        with open(args.out / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        budget.record(v.name, time.monotonic() - start)
        if code != 0:
            failed.append(name)
            tail = (args.out / f"{name}.log").read_text(errors="replace").replace("\r", "\n").splitlines()[-15:]
            print(f"[sweep] {name} FAILED (exit {code}); the end of its log:\n" + "\n".join(tail), flush=True)
            return
        r = _run_record(run_dir, seed)
        results[v.name].append(r)
        print(f"[sweep] {name}: holdout {100 * r['holdout']['accuracy']:.2f} % (loss {r['holdout']['loss']:.3f}) | "
              f"valid {100 * r['valid']['accuracy']:.2f} %, ROC AUC {r['valid']['roc_auc']:.4f} | "
              f"best epoch {r['best_epoch']}/{r['epochs']} | {r['train_seconds']:.0f} s training", flush=True)

    first, rest = args.seeds[0], args.seeds[1:]
    if args.select:
        for v in variants:
            train(v, first)
        finished = {n: rs for n, rs in results.items() if rs}
        if finished:
            best = next(v for v in variants if v.name == pick_best(finished))
            print(f"[sweep] picked on the holdout slice: {best.name}", flush=True)
            for seed in rest:
                train(best, seed)
    else:
        for v in variants:
            for seed in args.seeds:
                train(v, seed)

    def ensemble(label: str, runs: list[tuple[str, dict]]) -> dict | None:
        members = [args.runs_root / r["run"] for _, r in runs]
        if not budget.allows(sum(budget.expected(v) for v, _ in runs) / 12):
            skipped.append(f"{label}_ensemble")
            return None
        out_dir = args.runs_root / f"{label}_ensemble"
        cmd = [sys.executable, str(ROOT / "scripts" / "ensemble.py"), "--data-dir", args.data_dir,
               "--output-dir", str(out_dir), "--checkpoints", *map(str, members)]
        with open(args.out / f"{label}_ensemble.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            failed.append(f"{label}_ensemble")
            return None
        d = json.loads((out_dir / "metrics.json").read_text())
        return {"members": [m.name for m in members], "threshold": d["threshold"],
                "holdout": {k: d["holdout"][k] for k in ("accuracy", "roc_auc")},
                "valid": {k: d["valid"][k] for k in ("accuracy", "roc_auc", "average_precision")}}

    ensembles = {}
    for v in variants:
        if len(results[v.name]) > 1 and (e := ensemble(v.name, [(v.name, r) for r in results[v.name]])):
            ensembles[v.name] = e
    # Two architectures can err on different faces (see the docstring), so every run together too.
    everyone = [(name, r) for name, rs in results.items() for r in rs]
    mixed = ensemble("all", everyone) if sum(1 for rs in results.values() if rs) > 1 else None

    summary, table = summarize(results, ensembles)
    if mixed:
        table += (f"\nAll {len(everyone)} runs as one ensemble: valid {100 * mixed['valid']['accuracy']:.2f} %, "
                  f"ROC AUC {mixed['valid']['roc_auc']:.4f} (holdout {100 * mixed['holdout']['accuracy']:.2f} %)\n")
    summary = {"variants": summary, "ensemble_all": mixed, "skipped": skipped, "failed": failed,
               "seconds": round(budget.elapsed(), 1),
               "seeds": args.seeds, "split_seed": args.split_seed, "select": args.select}
    (args.out / "flagship.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "flagship.md").write_text(table)
    print(table + (f"skipped: {', '.join(skipped)}\n" if skipped else "") +
          (f"failed: {', '.join(failed)}\n" if failed else ""), flush=True)
    return 1 if failed or not any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
