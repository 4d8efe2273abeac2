r"""Train a real-vs-fake face detector on rvf10k with one Accelerate loop.

    # the seed's LeNet recipe on a local copy of rvf10k, on whatever this machine has
    accelerate launch scripts/train.py --config configs/lenet.yaml --data-dir ~/data/rvf10k

    # any other key, any timm model, and 2 GPUs
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/train.py \
        --model timm:efficientnet_b0 --image-size 256 --set hflip=0.5 --set scheduler=cosine

    # continue a run that was interrupted (and optionally extend it)
    accelerate launch scripts/train.py --resume runs/lenet --epochs 30

Settings come from the defaults in `rvf.config.TrainConfig`, then the YAML file, then the
flags; `--set key=value` reaches any key. Without --data-dir, rvf10k is downloaded from
Kaggle. Plain `python scripts/train.py ...` works too (one process).
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rvf.cli import end_process_group, stdout_reader_may_leave  # noqa: E402
from rvf.config import ConfigError, load_config, load_run_config, parse_override  # noqa: E402

FLAGS = {  # flag -> config key, for the settings people change most
    "model": "model", "data_dir": "data_dir", "output_dir": "output_dir", "epochs": "epochs",
    "batch_size": "batch_size", "lr": "lr", "image_size": "image_size", "seed": "seed",
    "tracker": "tracker", "mixed_precision": "mixed_precision",
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from rvf.config import TrainConfig

    d = TrainConfig()  # "default" below: the --config file's value if it sets one, else this
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", type=Path, help="YAML file of config keys (see configs/)")
    parser.add_argument("--model",
                        help=f"model name: rvf.models.list_models() or timm:<name> (default: {d.model})")
    parser.add_argument("--data-dir", help="rvf10k root (Kaggle layout or ROOT/{train,valid}/{real,fake}); "
                                           "default: download from Kaggle")
    parser.add_argument("--output-dir", help="where checkpoints and reports go (default runs/<config name>, "
                                             "or runs/<model> without --config)")
    parser.add_argument("--epochs", type=int,
                        help=f"number of epochs (with --resume: the new total; default: {d.epochs})")
    parser.add_argument("--batch-size", type=int, help=f"per process (default: {d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default: {d.lr:g})")
    parser.add_argument("--image-size", type=int, help="default: the model's declared input size")
    parser.add_argument("--seed", type=int,
                        help=f"seeds weights, holdout split, shuffling and augmentation (default: {d.seed})")
    parser.add_argument("--tracker", choices=["wandb", "tensorboard", "none"],
                        help="default wandb (offline when no API key is set)")
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"],
                        help="default auto: the launcher's if it asked for one, else bf16 where the "
                             "GPU or CPU does bf16 in hardware, else fp32 ('no')")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last saved epoch (its config.yaml is the base)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in the output dir (kept in OUTPUT_DIR/.replaced until the new "
                             "run has saved an epoch, and put back if it fails before)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (repeatable), e.g. --set hflip=0.5 --set crop_scale=[0.8,1]; "
                             "model_args.KEY=VALUE changes one entry of model_args, model_args={...} all of it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, with its value) and exit")
    return parser


def resolve_config(args):
    """Defaults (or the resumed run's config.yaml) <- --config <- --set <- named flags."""
    from rvf.config import TrainConfig

    base = None
    if args.resume is not None:
        from rvf.train import REPLACED_DIR  # here, not at the top: it imports torch, which --help need not

        # A resumed run continues in its own folder, from what it saved: another --output-dir would
        # be ignored (the same folder, however it is spelled, only says so again).
        if args.output_dir is not None and Path(args.output_dir).resolve() != args.resume.resolve():
            raise ConfigError(f"--resume {args.resume} continues in that folder; drop --output-dir "
                              f"(or copy the run to {args.output_dir} and resume that)")
        if args.overwrite:
            raise ConfigError(f"--resume {args.resume} keeps what the run saved and --overwrite discards it; "
                              "pass one of them")
        saved = args.resume / "config.yaml"
        if not saved.is_file():
            aside = args.resume / REPLACED_DIR
            raise ConfigError(f"--resume {args.resume}: no config.yaml there, so nothing to resume"
                              + (f"; an --overwrite was killed before its first epoch, and the run it was "
                                 f"replacing is in {aside}: move its contents back to resume it"
                                 if aside.is_dir() else ""))
        base = load_run_config(saved)
    overrides = dict(parse_override(o) for o in args.overrides)
    overrides.update({key: getattr(args, flag) for flag, key in FLAGS.items() if getattr(args, flag) is not None})
    if args.resume is not None:
        overrides["output_dir"] = str(args.resume)
    cfg = load_config(args.config, overrides, base=base or TrainConfig())
    if cfg.output_dir is None and args.config is not None:
        # A run is named after its recipe, as train_zoo.py and publish_results.py name them:
        # configs/alexnet_bn.yaml and configs/flagship_alexnet_bn.yaml train the same model.
        cfg = cfg.replace(source="--config", output_dir=str(Path("runs") / Path(args.config).stem))
    return cfg


def report(e: BaseException, *lines: str) -> None:
    """Print the error's lines, unless another process prints them for this one (`rvf.train.all_or_none`)."""
    if not getattr(e, "reported_elsewhere", False):
        close_bars()
        for line in lines or (f"error: {message(e)}",):
            print(line, file=sys.stderr)


def close_bars() -> None:
    """Clear progress bars an exception left open, so that its message starts a line of its own.

    The loops close theirs on the way out; a Ctrl-C inside tqdm's own constructor, after it drew
    the bar (it then starts its monitor thread), cannot: the message went onto the bar's line.
    """
    tqdm = sys.modules.get("tqdm.auto") or sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def message(e: Exception) -> str:
    """The error's own message, without the worker's traceback a DataLoader re-raise carries in it."""
    text = str(e)
    if text.startswith(f"Caught {type(e).__name__} in DataLoader worker"):
        # It ends in the worker's "rvf.data.transforms.BadImageError: <the message>".
        text = text.rpartition(f"{type(e).__name__}: ")[2].strip()
    return text


def peer_failed(e: Exception) -> bool:
    """Whether `e` is gloo's report that another process of the run left mid-collective."""
    import torch.distributed as dist

    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and isinstance(e, RuntimeError)  # torch.distributed.DistBackendError is one too
            and any(s in str(e) for s in ("Connection closed by peer", "Connection reset by peer")))


def interrupted(cfg, overwrite: bool = False) -> str:
    """The line a Ctrl-C leaves: what the run folder holds now, and how to go on from it."""
    import yaml

    from rvf.train import _LAUNCHER_VARS, latest_state, run_exists

    if cfg is None:
        return "interrupted"
    out = cfg.resolved_output_dir()
    if overwrite and (out / "config.yaml").is_file() and (
            yaml.safe_load((out / "config.yaml").read_text()) != yaml.safe_load(yaml.safe_dump(cfg.to_dict()))):
        # Stopped before the new run saved an epoch: the folder holds the run it was to replace
        # (put back, or never set aside), and --resume would continue that one.
        return (f"interrupted before the new run saved an epoch: {out} holds the run it was to replace, as it was; "
                "to replace it, run the same command again")
    if (state := latest_state(out)) is not None:
        epochs = int(state.name.removeprefix("epoch_")) + 1
        # A launched run (several processes, mixed precision) resumes under the same launch.
        launcher = " (started the same way: accelerate launch or torchrun, with the same options)" if any(
            var in os.environ for var in _LAUNCHER_VARS) else ""
        return (f"interrupted: {out} has {epochs} epoch{'s' * (epochs > 1)} saved; to continue: "
                f"scripts/train.py --resume {out}{launcher}")
    if run_exists(out):
        # prepare_output_dir refuses the same command again: it cannot tell this run from a live one.
        return f"interrupted: {out} saved no epoch, so there is nothing to resume; to start again, add --overwrite"
    return "interrupted before training started: nothing was saved; run the same command again"


def is_main_process() -> bool:
    """Whether this is the launcher's first process (or the only one): Ctrl-C reaches every process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"  # torchrun's and accelerate launch's, before the group is up


def main(args) -> int:
    import yaml

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from rvf.checkpoint import CheckpointError
    from rvf.data import BadImageError, DatasetError
    from rvf.data.download import DownloadError
    from rvf.tracking import TrackerError
    from rvf.train import DivergedError, RunDirError, train

    cfg = None
    try:
        cfg = resolve_config(args)
        if args.print_config:
            with stdout_reader_may_leave():  # `| head`; here, or the OSError handler below names it
                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        train(cfg, resume=args.resume is not None, overwrite=args.overwrite)
    except (ConfigError, DatasetError, BadImageError, RunDirError, CheckpointError) as e:
        report(e)
        return 2
    except (DivergedError, DownloadError, TrackerError) as e:  # not the input's fault: 1, as download_data.py
        report(e)
        return 1
    except ValueError as e:  # e.g. an unknown model name from the factory
        report(e)
        return 2
    except OSError as e:  # disk full, permission denied: say which file
        lines = [f"error: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")]
        if e.filename and cfg is not None and cfg.resolved_output_dir().resolve() in Path(e.filename).resolve().parents:
            lines.append("(writes into the run folder are atomic: the best model and states saved before are intact)")
        report(e, *lines)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: not a traceback, but where the run stands
        if is_main_process():
            close_bars()
            print(interrupted(cfg, args.overwrite), file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped
    except Exception as e:
        if getattr(e, "reported_elsewhere", False):  # a bug another process hit: its traceback is printed there
            return 1
        if peer_failed(e):
            # Another process stopped on its own error mid-training (a file only it decoded):
            # that error is the one to read, not this collective's traceback.
            import torch.distributed as dist

            print(f"error: process {dist.get_rank()} stopped: another process failed (see its error, "
                  "or its exit code in the launcher's summary)", file=sys.stderr)
            return 1
        raise
    finally:
        end_process_group()  # a run that stopped on an error left it up: SIGABRT at exit, at times
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
