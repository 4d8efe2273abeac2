"""One training config: a dataclass of defaults, overridden by a YAML file, then by flags.

Like nanoGPT's configurator, and unlike a silent dict merge, it is strict: an unknown key
or a value of the wrong type is an error that names the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

__all__ = ["RECIPE_NEUTRAL_KEYS", "ConfigError", "TrainConfig", "load_config", "load_run_config", "parse_override",
           "recipe_differences"]


class ConfigError(ValueError):
    """A config file or override that rvf cannot use; the message names the key or file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the
    last one silently, so a config that sets `lr` twice would train with whichever came later."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key of its own overrides, as meant
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in lines
            except TypeError:  # an unhashable key: the base class says so
                continue
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key} is set twice (first on line {lines[key] + 1})", key_node.start_mark)
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


@dataclass
class TrainConfig:
    # --- model ---
    model: str = "lenet"  # any name from rvf.models.list_models(), or "timm:<name>"
    model_args: dict = field(default_factory=dict)  # extra create_model kwargs, e.g. {drop_rate: 0.2}
    pretrained: bool = False  # timm models: ImageNet weights from the hub (needs internet)
    pretrained_file: Optional[str] = None  # local weights file instead of the hub

    # --- data ---
    data_dir: Optional[str] = None  # dataset root; None downloads rvf10k from Kaggle
    image_size: Optional[int] = None  # None: the model's declared input size
    interpolation: Optional[str] = None  # resize filter; None: the model's
    # Stratified slice of train for model selection and the threshold's calibration; 0 trains
    # on all of train, keeps the last epoch and the threshold 0.5.
    holdout: float = 0.1
    # Seed of that slice (and of `subset`); None: `seed`. Fix it to train several seeds on one
    # holdout slice, e.g. to ensemble them (scripts/ensemble.py needs a shared slice).
    split_seed: Optional[int] = None
    cache: bool = True  # decode every image once into a uint8 cache; False decodes per step
    cache_dir: Optional[str] = None  # None: $RVF_CACHE_DIR or ~/.cache/rvf
    skip_bad: bool = False  # skip (and count) unreadable images instead of failing
    num_workers: Optional[int] = None  # DataLoader workers; None: 0 with the cache, all cores without
    subset: Optional[int] = None  # a stratified random N images of each split, drawn with split_seed (smoke runs)

    # --- optimisation ---
    epochs: int = 20
    batch_size: int = 64  # per process
    eval_batch_size: Optional[int] = None  # None: 2 x batch_size
    optimizer: str = "adam"  # any timm.optim.create_optimizer_v2 name: adam, adamw, sgd, lamb...
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd/rmsprop only
    scheduler: str = "none"  # none | cosine | step
    warmup_epochs: float = 0.0
    min_lr: float = 0.0  # cosine floor
    step_size: int = 10  # step scheduler: epochs between decays, counted from the end of the warmup
    gamma: float = 0.1  # step scheduler: decay factor
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None  # max gradient norm
    # Keep an EMA of the weights (timm ModelEmaV3), e.g. 0.999. The first step's weights keep
    # decay**steps of the average: choose decay so that is small (0.999 over 4,000 steps: 2 %).
    ema_decay: Optional[float] = None
    # Ramp the EMA's decay up as 1 - (1 + step)**-0.75 (timm's warm-up, its power for runs of
    # under ~100k steps) until it reaches ema_decay (0.998 after ~4,000 steps): early weights then
    # fade fast instead of lingering, which a BatchNorm net's early epochs otherwise show
    # as a chance-level EMA for several epochs.
    ema_warmup: bool = False
    # Sharpness-Aware Minimization's radius (rvf.step.SAMTrainStep), e.g. 0.05; 0 = off. Each
    # step then takes two forward and backward passes, so an epoch costs about twice as long.
    sam_rho: float = 0.0
    # Knowledge distillation (rvf.distill): rvf run folders whose mean probability joins the
    # labels as the target, (1 - distill_weight) * label + distill_weight * teachers. Each must
    # read this run's image size and have held out the same slice (split_seed, holdout, subset).
    teachers: list = field(default_factory=list)
    distill_weight: float = 0.5
    tta_hflip: bool = False  # evaluate (holdout, valid, the saved model) on each image and its mirror, logits averaged
    aux_weight: float = 0.3  # loss weight of each auxiliary head (inception_v1 aux_logits: true); the paper's 0.3

    # --- augmentation (applied per sample, on the training device) ---
    hflip: float = 0.0  # probability of a horizontal flip
    # Train on a random crop_size x crop_size window of each image_size image, pixels copied
    # exactly (no resize); evaluation sees the whole image. Native-resolution patches keep the
    # texture a downscaled face loses, cost (crop_size / image_size)^2 of a full-image step, and
    # are new each epoch. The model must take both sizes: every rvf model and timm CNN pools
    # adaptively; a ViT with a fixed img_size does not.
    crop_size: Optional[int] = None
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random-resized-crop area range; (1, 1) = off
    translate: int = 0  # random shift of up to N pixels (reflect padding): no resampling, so texture stays intact
    brightness: float = 0.0
    contrast: float = 0.0
    erase: float = 0.0  # probability of erasing a random rectangle with noise (timm RandomErasing)
    # Shrink a random share of training images by a factor drawn from downscale_range, then
    # blow them back up (bilinear, antialiased): the degradation of a re-uploaded, resized face,
    # and scripts/robustness.py's "scale" test. A 256 px detector that learned only native-
    # resolution texture loses 19 points at 0.25x without it (docs/experiments.md).
    downscale: float = 0.0  # probability per image
    downscale_range: tuple[float, float] = (0.25, 1.0)  # (min, max) factor of the side
    # Batch mixing (timm Mixup), labels mixed in proportion; both alphas 0 = off. MixUp blends
    # two whole images; CutMix pastes a box of one image into another at the same position,
    # so every pixel keeps its place and its texture (aligned faces, see the README).
    mixup: float = 0.0  # MixUp's Beta(alpha, alpha), e.g. 0.2
    cutmix: float = 0.0  # CutMix's Beta(alpha, alpha), e.g. 1.0; with mixup too, each batch picks one at random
    mixup_prob: float = 1.0  # probability that a batch is mixed at all

    # --- speed ---
    # auto | no | fp16 | bf16 | None. auto: the launcher's choice if it made one, else bf16 where
    # the device does bf16 in hardware (recent GPUs; CPUs with AVX512-BF16/AMX: 1.2-2x per step
    # on an EPYC), else fp32. None: exactly the Accelerate config's, "no" included.
    mixed_precision: Optional[str] = "auto"
    channels_last: bool = True  # NHWC weights and batches: faster convs on GPUs, and on a 2-core CPU too (LeNet 1.4x)
    compile: bool = False  # torch.compile the model
    # the whole uint8 train split on the device, batches indexed there; None: on for GPUs, and
    # on a CPU for splits up to 256 MB
    device_data: Optional[bool] = None
    # torch threads per training process on a CPU. None: OMP_NUM_THREADS where it asks for more
    # than 1, else the process's share of the physical cores (`accelerate launch` and torchrun
    # set OMP_NUM_THREADS=1 when not told otherwise: one core of 2 trained, 1.6x slower;
    # on cores another job keeps busy, 1 can be faster: benchmarks/cpu_threads.sh).
    cpu_threads: Optional[int] = None
    fused_optimizer: bool = True  # torch's fused optimizer kernel where there is one (adam, adamw, sgd...)
    # Record each training step (forward, backward, optimizer) once as a CUDA graph and replay it:
    # one launch per step instead of hundreds, for small models the host cannot feed fast
    # enough (rvf.step). Needs one CUDA process, bf16 or fp32, adam/adamw, compile: false.
    # None (the default): on wherever those hold, eager steps elsewhere and if the capture
    # fails; true: fail instead; false: always eager. Measured on one H200 (README, GPU): the
    # seven 64 px seed configs train in 38 s with it; LeNet's step is 4.9x the eager one's speed.
    cuda_graph: Optional[bool] = None

    # --- tracking and output ---
    output_dir: Optional[str] = None  # None: runs/<model>
    tracker: str = "wandb"  # wandb | tensorboard | none
    project: str = "rvf"  # W&B project
    run_name: Optional[str] = None
    group: Optional[str] = None  # W&B group: runs of one zoo sweep compare side by side
    tags: list = field(default_factory=list)
    log_every: int = 20  # steps between progress-bar metric refreshes (each is one host sync)
    num_sample_preds: int = 32  # valid images in the W&B predictions table
    seed: int = 42

    @property
    def resolved_split_seed(self) -> int:
        """The seed that draws the holdout slice: `split_seed`, else `seed`."""
        return self.seed if self.split_seed is None else self.split_seed

    def resolved_output_dir(self) -> Path:
        # ~ expanded as data_dir and cache_dir are: a YAML file's `output_dir: ~/runs/x` is no shell word
        return Path(self.output_dir or Path("runs") / self.model.replace(":", "_").replace("/", "_")).expanduser()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def replace(self, source: str = "override", **changes) -> "TrainConfig":
        """Return a copy with `changes` applied, type-checked like a YAML file."""
        return _apply(self, changes, source)


# Keys that say where a run's files are, how it is tracked or how fast it goes, not what it
# trains: two runs that differ only in these fit the same model on the same images with the
# same schedule and augmentation, and their numbers differ only as two machines' do. Paths and
# threads are per machine; the layout, compile, fused and CUDA-graph steps, the data's place
# (cache, device_data, num_workers) and the eval batch are speed. mixed_precision is here
# because the configs' "auto" is per machine itself (bf16 where the hardware does it, else
# fp32); metrics.json records what a run used. split_seed is compared as the seed it resolves
# to (None: `seed`). Not here, though they look like paths or speed: pretrained_file and
# teachers (other weights, another model), skip_bad (fewer images), batch_size (another step).
RECIPE_NEUTRAL_KEYS = frozenset({
    "data_dir", "output_dir", "cache_dir", "tracker", "project", "run_name", "group", "tags", "log_every",
    "num_sample_preds", "cache", "num_workers", "cpu_threads", "eval_batch_size", "mixed_precision",
    "channels_last", "compile", "device_data", "fused_optimizer", "cuda_graph",
})


def recipe_differences(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Map each key on which `a` and `b` train differently (`RECIPE_NEUTRAL_KEYS` left out), in
    field order, to its two values."""
    def recipe(cfg: TrainConfig) -> dict:
        return cfg.to_dict() | {"split_seed": cfg.resolved_split_seed}

    ra, rb = recipe(a), recipe(b)
    return {k: (ra[k], rb[k]) for k in ra if k not in RECIPE_NEUTRAL_KEYS and ra[k] != rb[k]}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


# PyYAML follows YAML 1.1, whose floats need a dot: `1e-4` loads as the string "1e-4".
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number(value: Any) -> Any:
    """Read scientific notation that YAML left as text ("1e-4") as the float it means."""
    return float(value) if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()) else value


def _check(key: str, value: Any, source: str) -> Any:
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} may not be null")
    base = next(a for a in args if a is not type(None)) if optional else hint
    origin = typing.get_origin(base) or base
    want = {float: "a number", int: "an integer", bool: "true/false", str: "a string",
            list: "a list", dict: "a mapping", tuple: "a list of two numbers"}.get(origin, str(origin))
    quote = ' (YAML reads unquoted yes/no/on/off as true/false: put the value in quotes, e.g. "no")' \
        if origin is str and isinstance(value, bool) else ""
    bad = ConfigError(f"{source}: {key} must be {want}, got {value!r} ({type(value).__name__}){quote}")
    if origin is bool:
        if not isinstance(value, bool):
            raise bad
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif origin is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # YAML's .nan and .inf
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
        value = float(value)
    elif origin is tuple:
        value = [_number(v) for v in value] if isinstance(value, (list, tuple)) else value
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad
        value = tuple(float(v) for v in value)
    elif not isinstance(value, origin):
        raise bad
    return value


# What a type cannot say. Checked with the types, so a typo fails before any work, naming the key.
_CHOICES = {
    "interpolation": ("nearest", "bilinear", "bicubic", "lanczos", "box"),  # rvf.data.transforms.INTERPOLATIONS
    "scheduler": ("none", "cosine", "step"),
    "tracker": ("wandb", "tensorboard", "none"),
    "mixed_precision": ("auto", "no", "fp16", "bf16"),
}
_PROBABILITIES = ("hflip", "erase", "mixup_prob", "label_smoothing", "downscale", "distill_weight")
_AT_LEAST_ONE = ("epochs", "batch_size", "eval_batch_size", "step_size", "subset", "image_size", "log_every",
                 "num_sample_preds", "cpu_threads")
_NOT_NEGATIVE = ("weight_decay", "momentum", "warmup_epochs", "min_lr", "gamma", "aux_weight",
                 "brightness", "contrast", "translate", "num_workers", "grad_clip")


def _timm_optimizers() -> list[str]:
    """timm's optimizer names, or [] on a timm too old to list them (then the factory checks)."""
    try:
        from timm.optim import list_optimizers
    except ImportError:
        return []
    return list_optimizers()


def _check_value(key: str, value: Any, source: str) -> None:
    if value is None:
        return
    bad = None
    if key in _CHOICES and value not in _CHOICES[key]:
        bad = f"one of {', '.join(_CHOICES[key])}"
    elif key in _PROBABILITIES and not 0.0 <= value <= 1.0:
        bad = "between 0 and 1"
    elif key == "holdout" and not 0.0 <= value < 1.0:
        bad = "a fraction of train in [0, 1)"
    elif key in ("crop_scale", "downscale_range") and not (0.0 < value[0] <= value[1] <= 1.0):
        bad = "[min, max] with 0 < min <= max <= 1"
    elif key == "teachers" and not all(isinstance(t, str) and t for t in value):
        bad = "a list of run folders (paths)"
    elif key == "tags" and any(isinstance(t, bool) or not isinstance(t, (str, int, float)) for t in value):
        # Numbers become their text (rvf.tracking); a bare no/yes would reach W&B as "False"/"True".
        bad = 'a list of tags (put yes/no/on/off in quotes: ["no"])'
    elif key == "ema_decay" and not 0.0 < value < 1.0:
        bad = "between 0 and 1 (e.g. 0.999)"
    elif key in ("seed", "split_seed") and not 0 <= value < 2**32:
        bad = "in [0, 2**32) (what numpy and torch seed with)"
    elif key in _AT_LEAST_ONE and value < 1:
        bad = "at least 1"
    elif key in _NOT_NEGATIVE and value < 0:
        bad = "at least 0"
    elif key == "lr" and value <= 0:  # 0 trains for hours and never changes a weight
        bad = "above 0 (e.g. 1e-4)"
    elif key == "optimizer" and (known := _timm_optimizers()) and value.lower() not in known:
        import difflib

        close = difflib.get_close_matches(value.lower(), known, 3)
        bad = "a timm optimizer name" + (f" (did you mean {', '.join(close)}?)" if close else
                                         " (timm.optim.list_optimizers())")
    if bad:
        raise ConfigError(f"{source}: {key} must be {bad}, got {value!r}")


# What timm's train.py and Hugging Face's Trainer call some of the keys: suggested by name.
_ALIASES = {"opt": "optimizer", "learning_rate": "lr", "clip_grad": "grad_clip", "max_grad_norm": "grad_clip",
            "ema": "ema_decay", "model_ema": "ema_decay", "model_ema_decay": "ema_decay", "img_size": "image_size",
            "input_size": "image_size", "smoothing": "label_smoothing", "sched": "scheduler",
            "lr_scheduler_type": "scheduler", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
            "wd": "weight_decay", "mixup_alpha": "mixup", "cutmix_alpha": "cutmix", "warmup": "warmup_epochs",
            "drop": "model_args ({drop_rate: ...} for timm models)", "drop_rate": "model_args ({drop_rate: ...})",
            "amp": "mixed_precision", "workers": "num_workers", "threads": "cpu_threads",
            "num_threads": "cpu_threads", "data": "data_dir", "output": "output_dir"}


def _apply(cfg: TrainConfig, changes: dict, source: str) -> TrainConfig:
    unknown = sorted(set(changes) - set(_FIELDS))
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := [_ALIASES[k]] if k in _ALIASES else
                                                     difflib.get_close_matches(k, _FIELDS, 1, cutoff=0.7)) else k
                 for k in unknown]
        raise ConfigError(f"{source}: unknown config key(s): {', '.join(hints)}")
    checked = {k: _check(k, v, source) for k, v in changes.items()}
    for k, v in checked.items():
        _check_value(k, v, source)
    return dataclasses.replace(cfg, **checked)


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """PyYAML's error in one line, e.g. "line 2, column 7: found character '\\t' that cannot start any token"."""
    if isinstance(e, yaml.reader.ReaderError):  # a control character: PyYAML gives an offset, on a line of its own
        line, start = text.count("\n", 0, e.position), text.rfind("\n", 0, e.position) + 1
        return (f"line {line + 1}, column {e.position - start + 1}: unacceptable character #x{e.character:04x}: "
                f"{e.reason}")
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if problem is None:
        return str(e)
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else "") + problem


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key=value` override; the value is read as YAML (so `0.1`, `true`, `[1, 2]` work)."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():  # `--set =3` would be an unknown key named ""
        raise ConfigError(f"override {text!r} must look like key=value")
    key = key.strip().replace("-", "_")
    if key in _HINTS and _HINTS[key] in (str, Optional[str]) and raw.strip() not in ("", "null", "~"):
        return key, raw.strip()  # a string field takes the text as is: YAML would read `no` as false
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_problem(e, raw)})") from None
    return key, value


def _read_file(path: Path) -> dict:
    """The mapping a YAML config file holds, or a ConfigError naming the file."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file, e.g. configs/lenet.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:  # a Latin-1 file, or weights passed as --config
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e, text)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """Build a `TrainConfig`: defaults (or `base`), then the YAML file, then `overrides`.

    Raises:
        ConfigError: naming the file or key, for a missing/malformed file, an unknown key or
            a value of the wrong type.
    """
    cfg = base or TrainConfig()
    if path is not None:
        cfg = _apply(cfg, _read_file(Path(path)), str(path))
    if overrides:
        whole = {k: v for k, v in overrides.items() if "." not in k}
        cfg = _apply(cfg, whole, "command line")
        if dotted := {k: v for k, v in overrides.items() if "." in k}:  # after `model_args={...}`, into it
            cfg = _apply(cfg, _merge_entries(cfg, dotted), "command line")
    return cfg


def _merge_entries(cfg: TrainConfig, dotted: dict) -> dict:
    """`{"model_args.drop_rate": 0.3}` -> `{"model_args": cfg's model_args with drop_rate 0.3}`:
    one entry changed, where `model_args={drop_rate: 0.3}` replaces the whole mapping."""
    merged: dict[str, dict] = {}
    for key, value in dotted.items():
        name, _, entry = key.partition(".")
        if name not in _FIELDS:
            _apply(cfg, {name: None}, "command line")  # the unknown-key error, with its "did you mean"
        if _HINTS[name] is not dict or not entry or "." in entry:
            raise ConfigError(f"command line: {key}: only a mapping's own entries can be set this way "
                              f"(e.g. model_args.drop_rate=0.3); set {name} whole instead ({name}=VALUE)")
        merged.setdefault(name, dict(getattr(cfg, name)))[entry] = value
    return merged


def load_run_config(path: str | Path, warn: bool = True) -> TrainConfig:
    """Read the config.yaml that a run saved, to resume it: as `load_config` reads a file, but for
    true/false among its tags.

    A run saved before tags refused a bare yes/no/on/off holds `tags: [false]`. Which word it was
    is lost; rvf.tracking sent W&B the text "False", so that is the tag it keeps, with a warning
    (`warn`) saying how to name it otherwise. A new run's config still refuses it.
    """
    data = _read_file(Path(path))
    tags = data.get("tags")
    if isinstance(tags, list) and any(isinstance(t, bool) for t in tags):
        data["tags"] = [str(t) if isinstance(t, bool) else t for t in tags]
        if warn:
            logging.getLogger(__name__).warning(
                f"{path}: tags {tags} read as {data['tags']}, the text W&B was sent (saved before a bare yes/no/on/off "
                f"was refused); to tag the run otherwise, quote the words you meant there, e.g. tags: [\"no\"]")
    return _apply(TrainConfig(), data, str(path))
