"""Model registry and factory: `create_model`, `list_models`, `is_model`, `get_cam_layer`.

Modelled on timm's `_registry.py` (a plain dict filled by `@register_model`), `_factory.py`
(`create_model`, which prunes `None` kwargs) and the part of `_builder.py` that attaches a
model's config and loads its weights. rvf needs little of each, so they share one file; what
the model classes themselves share (init, classifier interface) is in `_base.py`.

Two kinds of name reach `create_model`:
    - registered names (`lenet`, `vgg16_bn`, ...): rvf's own from-scratch models;
    - `timm:<name>`: any timm model (see `_timm.py`). Ours never fall through to timm, since
      both libraries have a `vgg16` and a `resnet50` that are different models.
"""

import difflib
import fnmatch
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ._base import init_classifier
from ._timm import TIMM_PREFIX, create_timm_model, is_timm_model, timm_close_matches

__all__ = [
    "DEFAULT_INPUT_SIZE", "DEFAULT_MEAN", "DEFAULT_STD", "build_model_with_cfg", "create_model",
    "get_cam_layer", "init_classifier", "is_model", "list_models", "load_pretrained", "register_model",
    "scratch_cfg",
]

_logger = logging.getLogger(__name__)

# The seed protocol: 64x64 RGB scaled to [-1, 1]. Every scratch model declares these in its
# `pretrained_cfg`; transforms and the web app read them from there, not from here.
DEFAULT_INPUT_SIZE = (3, 64, 64)
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def scratch_cfg(cam_layer: str, **kwargs: Any) -> dict[str, Any]:
    """The default `pretrained_cfg` of a from-scratch rvf model (timm's per-family `_cfg`).

    Args:
        cam_layer: `get_submodule` path of the layer Grad-CAM reads (the last spatial features).
        **kwargs: entries that override or extend the defaults.

    Returns:
        The seed protocol's input (64 px RGB scaled to [-1, 1]), `fc` as the classifier and
        `cam_layer`, with `kwargs` on top.
    """
    return dict(
        input_size=DEFAULT_INPUT_SIZE, mean=DEFAULT_MEAN, std=DEFAULT_STD, interpolation="bilinear",
        classifier="fc", cam_layer=cam_layer, **kwargs,
    )


_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name.

    Args:
        fn: a constructor `fn(pretrained=False, **kwargs) -> nn.Module`.

    Returns:
        `fn`, unchanged.
    """
    mod = sys.modules[fn.__module__]
    name = fn.__name__
    if hasattr(mod, "__all__") and name not in mod.__all__:
        mod.__all__.append(name)
    if name in _model_entrypoints:
        warnings.warn(f"Overwriting {name} in the rvf model registry with {fn.__module__}.{name}.", stacklevel=2)
    _model_entrypoints[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """List registered (scratch) model names, sorted.

    Args:
        pattern: optional shell-style filter, e.g. `"vgg*"`.

    Returns:
        The matching names. timm models are not listed: see `timm.list_models()`.
    """
    names = sorted(_model_entrypoints)
    return fnmatch.filter(names, pattern) if pattern else names


def is_model(name: str) -> bool:
    """Return True for a registered name or for `timm:<name>` with a valid timm name."""
    if name.startswith(TIMM_PREFIX):
        return is_timm_model(name[len(TIMM_PREFIX):])
    return name in _model_entrypoints


def _unknown_model_error(name: str) -> ValueError:
    """Build the error for an unregistered name: the valid names and the `timm:` hint."""
    msg = f"Unknown model {name!r}. rvf models: {', '.join(list_models())}."
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.6)
    if close:
        msg += f" Did you mean {' or '.join(close)}?"
    if is_timm_model(name):
        msg += f" {name!r} is a timm model: use '{TIMM_PREFIX}{name}'."
    else:
        timm_close = timm_close_matches(name)
        msg += " timm models need the 'timm:' prefix"
        msg += f" (e.g. {', '.join(TIMM_PREFIX + c for c in timm_close)})." if timm_close else "."
    return ValueError(msg)


def create_model(
        name: str,
        num_classes: int = 2,
        pretrained: bool = False,
        pretrained_file: str | Path | None = None,
        **kwargs: Any,
) -> nn.Module:
    """Create a model by name: an rvf scratch model or `timm:<name>`.

    Args:
        name: a name from `list_models()`, or `timm:<timm name>`.
        num_classes: outputs of the classifier (0: none, `forward` returns pooled features).
        pretrained: load pretrained weights. Scratch models have no hosted weights and need
            `pretrained_file`; timm models download theirs unless `pretrained_file` is set.
        pretrained_file: a local `.safetensors` (or torch state dict) file. Implies
            `pretrained=True`. A classifier whose size differs from `num_classes` is left
            freshly initialised; every other weight must match.
        **kwargs: model arguments (e.g. `drop_rate`, `in_chans`). Arguments set to `None` are
            dropped, so one config schema (`drop_rate: null`) fits every model.

    Returns:
        The model, with `pretrained_cfg` (input_size, mean, std, ...) attached.

    Raises:
        ValueError: unknown model name (the message lists the valid names).
        RuntimeError: pretrained weights requested but unavailable.
        FileNotFoundError: `pretrained_file` does not exist.
    """
    # Options not every model supports default to None in configs; drop them (as timm does).
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if num_classes is None:  # `model_args: {num_classes: null}` means the default, as for any option
        num_classes = 2
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a whole number >= 0 (0: features only), got {num_classes!r}")
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"pretrained_file {str(pretrained_file)!r} does not exist")
        # Same mechanism for both kinds of model: timm's loader reads `file` from the overlay
        # and drops a classifier of the wrong size; `build_model_with_cfg` mirrors that.
        pretrained = True
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
        kwargs["pretrained_cfg_overlay"] = dict(overlay, file=str(pretrained_file))

    if name.startswith(TIMM_PREFIX):
        return create_timm_model(name[len(TIMM_PREFIX):], num_classes=num_classes, pretrained=pretrained, **kwargs)
    if name not in _model_entrypoints:
        raise _unknown_model_error(name)
    return _model_entrypoints[name](pretrained=pretrained, num_classes=num_classes, **kwargs)


def build_model_with_cfg(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        pretrained_cfg: dict[str, Any],
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        **kwargs: Any,
) -> nn.Module:
    """Instantiate a scratch model, attach its config and optionally load a weights file.

    Args:
        model_cls: the model class (or any callable returning a module).
        variant: registered name, stored as `pretrained_cfg["architecture"]`.
        pretrained: load the weights file given as `pretrained_cfg_overlay["file"]`.
        pretrained_cfg: the variant's default config (`scratch_cfg` for rvf's own families).
        pretrained_cfg_overlay: entries that override `pretrained_cfg`, e.g. `file`.
        **kwargs: passed to `model_cls`.

    Returns:
        The model, with `pretrained_cfg` and its alias `default_cfg` (the same dict, as timm).
    """
    cfg = {**pretrained_cfg, "architecture": variant, **(pretrained_cfg_overlay or {})}
    model = model_cls(**kwargs)
    model.pretrained_cfg = cfg
    model.default_cfg = model.pretrained_cfg  # timm keeps the old name as an alias
    if pretrained:
        if not cfg.get("file"):
            raise RuntimeError(
                f"rvf model {variant!r} has no hosted pretrained weights: pass pretrained_file=<a .safetensors "
                f"state dict of this model>, or use a 'timm:' model for ImageNet weights."
            )
        load_pretrained(model, cfg["file"])
    return model


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or, with weights_only, a torch file."""
    if str(path).endswith(".safetensors"):
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load a state dict file into `model`, keeping fresh what only one side has a use for.

    Fresh (and logged): classifier weights, under `model.pretrained_cfg["classifier"]`, whose
    shape differs (1000 -> 2 classes), that the model lacks (`num_classes=0`) or that the file
    lacks (a features-only save); and heads that only train, under `pretrained_cfg["train_only"]`
    (Inception's auxiliary classifiers), present on one side only. Everything else loads strictly.

    Args:
        model: a model built by `build_model_with_cfg`.
        path: `.safetensors` file, or a torch file holding a plain state dict.

    Raises:
        RuntimeError: missing, unexpected or mismatched keys outside those heads.
    """
    state_dict = _read_state_dict(path)
    cfg = model.pretrained_cfg

    def under(key: str, entry: str) -> bool:
        prefixes = cfg.get(entry) or ()
        return any(key.startswith(p + ".") for p in ((prefixes,) if isinstance(prefixes, str) else prefixes))

    own = model.state_dict()
    misfit = [k for k in state_dict if k not in own or own[k].shape != state_dict[k].shape]
    dropped = [k for k in misfit if under(k, "classifier") or (under(k, "train_only") and k not in own)]
    for k in dropped:
        del state_dict[k]
    result = model.load_state_dict(state_dict, strict=False)
    fresh = [k for k in result.missing_keys if under(k, "classifier") or under(k, "train_only")]
    missing = [k for k in result.missing_keys if k not in fresh]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{path} does not match the model: missing {missing}, unexpected {result.unexpected_keys}")
    if dropped or fresh:
        _logger.info("%s: %s left out, %s freshly initialised (heads the file or the model has no use for)",
                     path, dropped, fresh)


def get_cam_layer(model: nn.Module) -> nn.Module:
    """Return the layer Grad-CAM should hook: the model's last convolutional stage.

    Resolution order:
        1. rvf models: `model.pretrained_cfg["cam_layer"]`, a `get_submodule` path.
        2. timm models: the module of the last `model.feature_info` entry (timm's own record
           of its feature stages, e.g. `layer4` for resnet18, `stages.3` for convnext_nano,
           `blocks.6` for efficientnet_b0). A transformer whose head reads only the class
           token (`global_pool="token"`: ViT, DeiT) gets that last block's `norm1` instead,
           the input to its attention: the block's own patch-token outputs never reach
           the head, so their gradient, and every Grad-CAM map read there, is zero.
        3. otherwise: the module whose output `forward_features` returns, found by one
           forward pass of a zero image of `pretrained_cfg["input_size"]` (default 224 px)
           with hooks on every submodule; the outermost such module wins (e.g. a stage rather
           than its last block, so an in-place activation is included).

    Args:
        model: a model from `create_model` (or any module with `forward_features`).

    Returns:
        The submodule. For vision transformers its output is (B, N, C) tokens, not (B, C, H, W):
        Grad-CAM then needs a reshape transform.

    Raises:
        ValueError: no layer could be found.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("cam_layer"):
        return model.get_submodule(cfg["cam_layer"])
    feature_info = getattr(model, "feature_info", None)
    if isinstance(feature_info, (list, tuple)) and feature_info and feature_info[-1].get("module"):
        try:
            layer = model.get_submodule(feature_info[-1]["module"])
        except AttributeError:
            pass  # a name timm derived differently from the module tree: use the fallback
        else:
            # As pytorch-grad-cam's ViT recipe (`model.blocks[-1].norm1`): see the docstring.
            if getattr(model, "global_pool", None) == "token" and isinstance(getattr(layer, "norm1", None), nn.Module):
                return layer.norm1
            return layer
    return _forward_features_module(model, cfg.get("input_size", (3, 224, 224)))


@torch.no_grad()
def _forward_features_module(model: nn.Module, input_size: tuple[int, ...]) -> nn.Module:
    """Find the outermost submodule whose output is the tensor `forward_features` returns."""
    if not hasattr(model, "forward_features"):
        raise ValueError(f"{type(model).__name__} has no forward_features; pass the Grad-CAM layer explicitly")
    calls: list[tuple[nn.Module, Any]] = []  # keep outputs alive so their ids stay unique
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, out))) for m in model.modules()
             if m is not model]
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)  # (1, C, H, W)
    was_training = model.training
    try:
        model.eval()
        features = model.forward_features(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    # Hooks fire inner-first, so the last match is the outermost module producing `features`.
    for mod, out in reversed(calls):
        if out is features:
            return mod
    raise ValueError(f"No submodule of {type(model).__name__} outputs forward_features; pass the layer explicitly")
