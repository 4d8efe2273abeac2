"""The `timm:` side of the factory: ImageNet architectures (and weights) from timm.

`create_model("timm:efficientnet_b0")` lands here. Everything timm-specific lives in this
file, so `_registry.py` only has to know the prefix. Names are explicit because timm and rvf
both have a `vgg16` and a `resnet50` that are different models (timm's are the 224 px
ImageNet ones, ours are the seed's 64 px ones): a name must never switch between them.
"""

import difflib

from torch import nn

__all__ = ["TIMM_PREFIX", "create_timm_model", "is_timm_model", "timm_close_matches"]

TIMM_PREFIX = "timm:"


def is_timm_model(name: str) -> bool:
    """Return True if `name` (without the prefix, pretrained tag allowed) is a timm model."""
    import timm

    return timm.is_model(name)


def timm_close_matches(name: str, n: int = 3) -> list[str]:
    """Return up to `n` timm model names that look like `name` (for error messages)."""
    import timm

    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.7)


def create_timm_model(
        name: str,
        num_classes: int = 2,
        pretrained: bool = False,
        **kwargs,
) -> nn.Module:
    """Build a timm model with a fresh `num_classes` head.

    Args:
        name: timm model name without the `timm:` prefix, e.g. `"resnet18"` or
            `"resnet18.a1_in1k"` (a pretrained tag picks the weights).
        num_classes: outputs of the new classifier; timm drops the ImageNet one when the
            pretrained weights have another size.
        pretrained: load pretrained weights. Without `pretrained_cfg_overlay=dict(file=...)`
            timm downloads them from its hub.
        **kwargs: passed to `timm.create_model` (e.g. `drop_rate`, `in_chans`,
            `pretrained_cfg_overlay`).

    Returns:
        The timm model; its `pretrained_cfg` gives its input size, mean and std.

    Raises:
        ValueError: `name` is not a timm model.
        RuntimeError: the weights could not be downloaded (offline machine, no hosted
            weights); the message says to pass `pretrained_file=`, the cause is chained.
    """
    if name.startswith(("hf-hub:", "local-dir:")):  # timm accepts them, but they name weights, not a model
        raise ValueError(f"'{TIMM_PREFIX}{name}': rvf takes a timm architecture name (e.g. 'timm:resnet18', or "
                         f"'timm:resnet18.a1_in1k' for a tag's weights); for weights in a file or folder, pass "
                         f"pretrained_file=<its .safetensors>")
    if not is_timm_model(name):
        close = timm_close_matches(name)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"Unknown timm model {name!r}.{hint} See timm.list_models() for the names.")
    import timm

    from_file = bool((kwargs.get("pretrained_cfg_overlay") or {}).get("file"))
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as e:
        # A hub download fails with OSError (no network, missing file) or RuntimeError ("No
        # pretrained weights exist"). Local files and non-weight errors keep timm's own error.
        if not pretrained or from_file:
            raise
        raise RuntimeError(
            f"Could not get pretrained weights for '{TIMM_PREFIX}{name}' from the hub ({type(e).__name__}: "
            f"{e}). On an offline machine, download the weights elsewhere and pass "
            f"pretrained_file=<local .safetensors or .pth state dict>."
        ) from e
