"""VGG.

Paper: `Very Deep Convolutional Networks for Large-Scale Image Recognition` - Simonyan and
Zisserman, 2014 (configuration D = VGG16). Layout and names follow torchvision's `vgg.py`
(https://github.com/pytorch/vision, BSD-3-Clause); the file follows timm's `vgg.py`.

Written here rather than wrapped: the seed's version was written for 64x64 inputs only,
and both library versions carry a head sized for 224 px ImageNet. torchvision pools to
7x7 and timm's `ConvMlp` upsamples to 7x7, then a 25088 -> 4096 -> 4096 MLP (about 120M
parameters, 8x the conv layers). At 64 px conv5 is only 4x4, so that head would learn
from upsampled copies of 2x2 values. Here:
    - The fifth max-pool is the head's adaptive max-pool to `pool_size` (2x2). At 64 px it
      is exactly the paper's 2x2 stride-2 pool, and the head works for any input of 16 px
      or more. forward_features (and Grad-CAM) see conv5 before that pool: 4x4 at 64 px.
    - The MLP is `head_hidden_size` wide (1024, not 4096): 2048 -> 1024 -> 1024 -> classes,
      about 3M parameters next to 14.7M in the convolutions. It is quick to train on a CPU
      and less prone to overfit a few thousand faces.
    - `vgg16_bn` passes `norm_layer=nn.BatchNorm2d` (BatchNorm after every convolution).
    - Initialisation is Kaiming-normal with fan_in for the convolutions, which keeps the
      signal's scale through the stack: at init the last conv's ReLU output has std 1.45 for a
      unit-variance input. torchvision's fan_out shrinks it ~16x (std 0.09: the first conv has
      fan_in 27 against fan_out 576, and every stage that doubles the channels halves the
      variance again). With activations that small, Adam's first steps on the zero-initialised
      conv biases (lr 1e-4 per step, whatever the gradient's size) outweigh the input, and the
      network drifts to an input-independent output: on rvf10k the logits' spread fell from
      0.086 to 0.012 in 30 steps (scripts/probe_training.py) and a 20-epoch run sat at 50-57 %
      for 6 epochs, the seed's "VGG16 never learned" under the seed's own protocol (Adam
      1e-4). fan_in fixes it without changing the protocol. The head's hidden linears
      are Kaiming (fan_in) too, and only the classifier gets torchvision's N(0, 0.01), which
      would shrink the signal ~3x per 1024-wide hidden layer.
    - `first_pool=False` drops the max-pool after the first block, so blocks 2-5 of an S px
      face run on the grid a 2S px face gets by default (conv5 8x8 at 64 px), from the same
      pixels: VGG's counterpart of AlexNet's `stem_stride=2`, at 3.6x the multiply-adds (4.54 G per 64 px face).
    - `init_std=0.01` draws every conv and linear from N(0, 0.01) instead. Only for
      `vgg16_bn`: BatchNorm restores the signal's scale after each conv, and the smaller
      weights learn faster relative to their size under Adam, which under the seed's
      protocol took VGG16+BN from 78.47 % to 86.43 % (configs/vgg16_bn.yaml).
    - `coords=True` appends each pixel's x and y to the image (`CoordChannels`, CoordConv),
      so the first conv can tell where on the aligned face it is.
"""

from collections.abc import Callable

import torch
from torch import nn

from ._base import AdaptiveMaxPool2d, ClassifierMixin, CoordChannels, init_weights, mlp_pre_logits, resolve_norm_layer
from ._registry import build_model_with_cfg, register_model, scratch_cfg

__all__ = ["VGG"]

# Output channels of each 3x3 convolution; "M" is a 2x2 stride-2 max-pool. The paper's fifth
# max-pool is the head's adaptive pool (see module docstring).
cfgs: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


class VGG(ClassifierMixin, nn.Module):
    """VGG with an adaptive max-pool head and a small MLP.

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
        init_std: None for the Kaiming init below; a float draws every conv and linear from
            N(0, init_std) (see `rvf.models._base.init_weights`).
        first_pool: keep the max-pool after the first block (the paper's); False doubles the
            grid of every later block.
        coords: append two channels holding each pixel's x and y (`CoordChannels`), so the
            first conv reads `in_chans + 2`.
    """

    def __init__(
            self,
            cfg: list[int | str],
            num_classes: int = 2,
            in_chans: int = 3,
            drop_rate: float = 0.5,
            norm_layer: Callable[..., nn.Module] | str | None = None,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            pool_size: int = 2,
            head_hidden_size: int = 1024,
            init_std: float | None = None,
            first_pool: bool = True,
            coords: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.head_hidden_size = head_hidden_size
        layers: list[nn.Module] = []
        prev_chs = in_chans
        if coords:
            layers.append(CoordChannels())
            prev_chs += CoordChannels.out_extra
        norm_layer = resolve_norm_layer(norm_layer, "vgg")
        if not isinstance(first_pool, bool):
            raise ValueError(f"first_pool must be true or false, got {first_pool!r}")
        if init_std is not None and norm_layer is None:
            raise ValueError("init_std is for vgg16_bn: without BatchNorm to restore the signal's scale, N(0, "
                             f"{init_std}) weights shrink it at every layer (plain vgg16 uses Kaiming)")
        if not first_pool:
            first = cfg.index("M")
            cfg = cfg[:first] + cfg[first + 1:]
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            # A bias before BatchNorm is cancelled by its mean subtraction.
            layers.append(nn.Conv2d(prev_chs, v, kernel_size=3, padding=1, bias=norm_layer is None))
            if norm_layer is not None:
                layers.append(norm_layer(v))
            layers.append(act_layer(inplace=True))
            prev_chs = v
        self.features = nn.Sequential(*layers)
        self.num_features = prev_chs

        self.global_pool = AdaptiveMaxPool2d(pool_size)
        self.pre_logits = mlp_pre_logits(prev_chs * pool_size * pool_size, head_hidden_size, act_layer, drop_rate)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, conv_mode="fan_in", std=init_std)  # see the module docstring

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the conv5 feature map before the last pool, (B, 512, H/16, W/16); H/8 without `first_pool`."""
        return self.features(x)  # (B, 512, 4, 4) at 64 px


def _create_vgg(variant: str, pretrained: bool = False, **kwargs) -> VGG:
    arch = variant.split("_")[0]  # vgg16_bn shares vgg16's layer table
    return build_model_with_cfg(VGG, variant, pretrained, default_cfgs[variant], cfg=cfgs[arch], **kwargs)


default_cfgs = {"vgg16": scratch_cfg("features"), "vgg16_bn": scratch_cfg("features")}


@register_model
def vgg16(pretrained: bool = False, **kwargs) -> VGG:
    """VGG16 (configuration D), small MLP head, Kaiming init."""
    return _create_vgg("vgg16", pretrained, **kwargs)


@register_model
def vgg16_bn(pretrained: bool = False, **kwargs) -> VGG:
    """VGG16 with BatchNorm after every convolution."""
    model_args = dict(norm_layer=nn.BatchNorm2d, **kwargs)
    return _create_vgg("vgg16_bn", pretrained, **model_args)
