"""AlexNet.

Paper: `ImageNet Classification with Deep Convolutional Neural Networks` - Krizhevsky et al., 2012,
in the single-tower widths (64-192-384-256-256) of `One weird trick for parallelizing
convolutional neural networks` - Krizhevsky, 2014, as in torchvision's `alexnet.py`
(https://github.com/pytorch/vision, BSD-3-Clause), whose layer layout and names we keep.

Written here rather than wrapped: torchvision's AlexNet needs inputs of at least 63 px (a
fixed 6x6 average pool feeds a 9216 -> 4096 -> 4096 head, 54M parameters), timm has none,
and the seed's version was written for 64x64 inputs only. Changes for 64 px faces:
    - The paper's third max-pool is the head's adaptive max-pool to `pool_size` (2x2), so
      the head does not depend on the input size; at 64 px conv5 gives a 3x3 map, and
      any input of 31 px or more works.
    - The MLP is `head_hidden_size` wide (1024, not 4096): a 2x2x256 input does not need
      a 4096-wide head, and a small one trains faster on a CPU and overfits less on a few
      thousand faces.
    - `alexnet_bn` puts BatchNorm after every convolution (`norm_layer`); the paper's local
      response normalisation is dropped, as in torchvision.
    - `space_to_depth=2` folds each 2x2 block of pixels into channels before conv1 (as
      TResNet's stem does), so a 256 px face costs about what a 128 px one does past conv1
      while conv1 still reads every native pixel, not a resized copy.
    - `stem_stride=2` halves conv1's stride (and doubles its padding), so an S px face gets
      the conv grid a 2S px face gets by default, from the same pixels.
    - `highpass=True` appends fixed high-pass residuals of each colour channel to the image
      (`HighPassResiduals`, the SRM kernels of image forensics), so conv1 reads 12 channels.
    - `coords=True` appends each pixel's x and y (`CoordChannels`, CoordConv), so conv1 can
      tell where on the aligned face it is.
Dropout follows the paper: after the first two fully connected layers.
"""

from collections.abc import Callable

import torch
from torch import nn

from ._base import (
    AdaptiveMaxPool2d,
    ClassifierMixin,
    CoordChannels,
    HighPassResiduals,
    init_weights,
    mlp_pre_logits,
    resolve_norm_layer,
)
from ._registry import build_model_with_cfg, register_model, scratch_cfg

__all__ = ["AlexNet"]

# (out_chs, kernel, stride, padding) per convolution; "M" is a 3x3 stride-2 max-pool. The
# paper's last max-pool is the head's adaptive pool (see module docstring).
cfgs: dict[str, list[tuple[int, int, int, int] | str]] = {
    "alexnet": [(64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)],
}


class AlexNet(ClassifierMixin, nn.Module):
    """AlexNet with an adaptive max-pool head.

    Args:
        cfg: layer table, see `cfgs`.
        num_classes: classifier outputs; 0 leaves `fc` as an identity.
        in_chans: input image channels.
        drop_rate: dropout after each hidden layer of the MLP head.
        norm_layer: normalisation after every convolution (e.g. `nn.BatchNorm2d`, or a timm
            norm name such as "batchnorm"); None or "none" for the paper's plain convolutions.
        act_layer: activation after every convolution and hidden linear layer.
        pool_size: output size of the head's adaptive max-pool.
        head_hidden_size: width of the two hidden linear layers.
        space_to_depth: fold each s x s block of pixels into channels before conv1
            (`nn.PixelUnshuffle`); 1 (the default) leaves the input as it is.
        stem_stride: conv1's stride, 4 (the paper's) or 2; with 2, conv1's padding is 4, so
            an S px input (S even) gives exactly the grid a 2S px input gives with stride 4.
        highpass: append fixed high-pass residuals of each channel to the input
            (`HighPassResiduals`), before any `space_to_depth`.
        coords: append two channels holding each pixel's x and y (`CoordChannels`), after
            any high-pass residuals and before any `space_to_depth`.
    """

    def __init__(
            self,
            cfg: list[tuple[int, int, int, int] | str],
            num_classes: int = 2,
            in_chans: int = 3,
            drop_rate: float = 0.5,
            norm_layer: Callable[..., nn.Module] | str | None = None,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            pool_size: int = 2,
            head_hidden_size: int = 1024,
            space_to_depth: int = 1,
            stem_stride: int = 4,
            highpass: bool = False,
            coords: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.head_hidden_size = head_hidden_size
        if space_to_depth < 1:
            raise ValueError(f"space_to_depth must be >= 1, got {space_to_depth}")
        if isinstance(stem_stride, bool) or stem_stride not in (2, 4):
            raise ValueError(f"stem_stride must be 2 or 4, got {stem_stride!r}")
        norm_layer = resolve_norm_layer(norm_layer, "alexnet")
        if stem_stride != 4:  # floor((S + 8 - 11) / 2) == floor((2S + 4 - 11) / 4) for every even S
            out_chs, kernel, _, _ = cfg[0]
            cfg = [(out_chs, kernel, stem_stride, 4), *cfg[1:]]
        layers: list[nn.Module] = []
        prev_chs = in_chans
        if highpass:
            layers.append(HighPassResiduals(in_chans))
            prev_chs = layers[-1].out_chans
        if coords:
            layers.append(CoordChannels())
            prev_chs += CoordChannels.out_extra
        if space_to_depth > 1:
            layers.append(nn.PixelUnshuffle(space_to_depth))
            prev_chs *= space_to_depth ** 2
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
                continue
            out_chs, kernel, stride, padding = v
            # A bias before BatchNorm is cancelled by its mean subtraction.
            layers.append(nn.Conv2d(prev_chs, out_chs, kernel, stride, padding, bias=norm_layer is None))
            if norm_layer is not None:
                layers.append(norm_layer(out_chs))
            layers.append(act_layer(inplace=True))
            prev_chs = out_chs
        self.features = nn.Sequential(*layers)
        self.num_features = prev_chs

        self.global_pool = AdaptiveMaxPool2d(pool_size)
        self.pre_logits = mlp_pre_logits(prev_chs * pool_size * pool_size, head_hidden_size, act_layer, drop_rate)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self)  # Kaiming fan_out convs; see rvf.models._base

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the conv5 feature map, (B, 256, H', W')."""
        return self.features(x)  # (B, 256, 3, 3) at 64 px, (B, 256, 15, 15) at 256 px


def _create_alexnet(variant: str, pretrained: bool = False, **kwargs) -> AlexNet:
    arch = variant.split("_")[0]  # alexnet_bn shares alexnet's layer table
    return build_model_with_cfg(AlexNet, variant, pretrained, default_cfgs[variant], cfg=cfgs[arch], **kwargs)


default_cfgs = {"alexnet": scratch_cfg("features"), "alexnet_bn": scratch_cfg("features")}


@register_model
def alexnet(pretrained: bool = False, **kwargs) -> AlexNet:
    """AlexNet (Krizhevsky et al., 2012), single-tower widths, small MLP head."""
    return _create_alexnet("alexnet", pretrained, **kwargs)


@register_model
def alexnet_bn(pretrained: bool = False, **kwargs) -> AlexNet:
    """AlexNet with BatchNorm after every convolution."""
    model_args = dict(norm_layer=nn.BatchNorm2d, **kwargs)
    return _create_alexnet("alexnet_bn", pretrained, **model_args)
