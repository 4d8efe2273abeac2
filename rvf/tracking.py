"""Experiment tracking through Accelerate's tracker API: W&B, TensorBoard or none.

W&B must never prompt and never block a run: without credentials it logs offline into the
run folder, says so once, and prints the `wandb sync` command that uploads it later. With
`WANDB_API_KEY`, a `wandb login` or `WANDB_MODE` set, it behaves as W&B users expect.
"""

from __future__ import annotations

import configparser
import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from rvf import CLASSES

__all__ = ["TRACKERS", "TrackerError", "project_name", "resolve_tracker", "tracker_config", "start_error",
           "log_final_wandb"]

log = logging.getLogger(__name__)

TRACKERS = ("wandb", "tensorboard", "none")
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")
DEFAULT_PROJECT = "rvf"  # TrainConfig.project's default
_WANDB_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in a project name


class TrackerError(RuntimeError):
    """The tracker could not start its run (W&B's server unreachable, a rejected key)."""


def project_name(cfg) -> str:
    """The project to log to: `project` when set, else W&B's own `WANDB_PROJECT`, else "rvf".

    Checked here, before anything is trained or replaced: W&B refuses some names only when
    the run starts, after `--overwrite` has removed the previous run.
    """
    from rvf.config import ConfigError

    project = cfg.project
    if project == DEFAULT_PROJECT and os.environ.get("WANDB_PROJECT") and cfg.tracker == "wandb":
        project = os.environ["WANDB_PROJECT"]
    bad = [c for c in _WANDB_FORBIDDEN if c in project]
    if not project or bad or len(project) > 128 or project.strip(".") == "":
        raise ConfigError(f"project {project!r} is not a valid project name: 1-128 characters, not only dots, "
                          f"none of {' '.join(_WANDB_FORBIDDEN)} (a W&B entity goes in WANDB_ENTITY)")
    return project


def _wandb_base_url() -> str | None:
    """The W&B server URL as wandb resolves it: WANDB_BASE_URL, else the base_url that `wandb login
    --host` saved in a settings file (a workspace's wandb/settings over the global one in
    WANDB_CONFIG_DIR, by default ~/.config/wandb), else None: wandb's own default server."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url
    global_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    url = None
    for path in (global_dir / "settings", Path(os.environ.get("WANDB_DIR") or ".") / "wandb" / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (OSError, configparser.Error):  # wandb skips an unreadable settings file too
            continue
        url = parser.get("default", "base_url", fallback=url)
    return url


def _wandb_has_credentials() -> bool:
    """Whether wandb finds a key without prompting: in the environment, or in the netrc entry
    `wandb login` wrote for the server it resolves to."""
    import wandb

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        rc = netrc.netrc(Path(os.environ.get("NETRC") or "~/.netrc").expanduser())  # NETRC=~/x as a shell would
    except (OSError, netrc.NetrcParseError):
        return False
    # `wandb login` names the entry by the URL's host[:port]. wandb 0.31's default server,
    # api.forge.coreweave.com, also takes the key an older wandb saved for api.wandb.ai.
    host = urlsplit(_wandb_base_url() or wandb.Settings().base_url).netloc
    machines = (host, "api.wandb.ai") if host == "api.forge.coreweave.com" else (host,)
    return any((rc.authenticators(m) or ("", "", ""))[2] for m in machines)  # an entry without a key: wandb prompts


def resolve_tracker(cfg, out_dir: Path) -> tuple[str | None, dict, str | None]:
    """Decide what Accelerate logs with.

    Returns:
        (log_with for `Accelerator`, init_kwargs for `init_trackers`, a one-time message or None).
    """
    if cfg.tracker not in TRACKERS:
        raise ValueError(f"tracker must be one of {TRACKERS}, got {cfg.tracker!r}")
    if cfg.tracker == "none":
        return None, {}, None
    if cfg.tracker == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None, {}, "tensorboard is not installed (pip install tensorboard): tracking disabled"
        return "tensorboard", {}, f"TensorBoard logs: tensorboard --logdir {out_dir}"
    try:
        import wandb  # noqa: F401
    except ImportError:
        return None, {}, "wandb is not installed (pip install wandb): tracking disabled"
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        from rvf.config import ConfigError

        raise ConfigError(f"WANDB_MODE={mode!r} is not a W&B mode (one of {', '.join(WANDB_MODES)})")
    message = None
    if mode is None and not _wandb_has_credentials():
        mode = "offline"
        message = (f"W&B: no API key found (WANDB_API_KEY or `wandb login`), logging offline under "
                   f"{out_dir / 'wandb'}; upload later with: wandb sync {out_dir / 'wandb'}/offline-run-*")
    wandb_kwargs = {
        "name": cfg.run_name or os.environ.get("WANDB_NAME") or out_dir.name,
        "group": cfg.group,
        "tags": [str(t) for t in cfg.tags] or None,  # YAML reads `tags: [2024]` as a number
        "dir": str(out_dir),
        "job_type": "train",
    }
    if mode is not None:
        wandb_kwargs["mode"] = mode
    return "wandb", {"wandb": {k: v for k, v in wandb_kwargs.items() if v is not None}}, message


def start_error(e: Exception, log_with: str | None) -> TrackerError | None:
    """W&B's own failure to start a run (its errors are wandb.errors.*) as one line that says
    how to train anyway; None for anything else, which is not the tracker's to explain."""
    if log_with != "wandb" or not type(e).__module__.startswith("wandb"):
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return TrackerError(f"W&B could not start the run ({type(e).__name__}: {first}); log offline with "
                        "WANDB_MODE=offline (upload later with wandb sync) or train with --tracker none")


def tracker_config(cfg_dict: dict, log_with: str | None) -> dict:
    """The config to send to the tracker; TensorBoard's hparams only take scalars."""
    if log_with != "tensorboard":
        return cfg_dict
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg_dict.items()}


def log_final_wandb(run, labels, probs, rows, images, paths, metrics: dict, report_files: list[Path]) -> None:
    """Log the valid split's confusion matrix and ROC as W&B plots, a predictions table with
    images, the report PNGs, and the final metrics into the run summary.

    Args:
        run: the `wandb.Run` (from `accelerator.get_tracker("wandb", unwrap=True)`).
        labels: (N,) valid labels; probs: (N, 2) probabilities.
        rows: (K,) the indices into `labels`/`probs` of the table's images.
        images: (K, 3, H, W) uint8 sample images for the table; paths: their K file paths.
        metrics: the metrics dict written to metrics.json.
        report_files: PNG files to attach.
    """
    import wandb

    from rvf.metrics import predicted_labels

    labels = np.asarray(labels)
    probs = np.asarray(probs)
    preds = predicted_labels(probs)
    table = wandb.Table(columns=["image", "file", "label", "prediction", "p_fake"])
    for img, path, i in zip(images, paths, rows, strict=True):
        table.add_data(wandb.Image(np.asarray(img).transpose(1, 2, 0)), Path(path).name,
                       CLASSES[labels[i]], CLASSES[preds[i]], float(probs[i, 0]))
    run.log({
        "valid/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=labels.tolist(), preds=preds.tolist(), class_names=list(CLASSES)),
        "valid/roc": wandb.plot.roc_curve(labels.tolist(), probs.tolist(), labels=list(CLASSES)),
        "valid/predictions": table,
        **{f"reports/{p.stem}": wandb.Image(str(p)) for p in report_files if p.is_file()},
    })
    flat = {}
    for split in ("valid", "holdout"):
        for k, v in metrics.get(split, {}).items():
            if isinstance(v, (int, float)):
                flat[f"{split}/{k}"] = v
    for k in ("best_epoch", "train_seconds", "images_per_second", "params", "macs"):
        if k in metrics:
            flat[k] = metrics[k]
    run.summary.update(flat)
