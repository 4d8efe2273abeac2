"""Inception v1 (GoogLeNet).

Paper: `Going Deeper with Convolutions` - Szegedy et al., 2014 (widths from its Table 1).
Layout and names follow torchvision's `googlenet.py` (https://github.com/pytorch/vision,
BSD-3-Clause).

Written here rather than wrapped: timm has no Inception v1, torchvision's warns on
construction unless `init_weights` is passed, shifts inputs for its ImageNet weights
(`transform_input`) and keeps a 3x3 convolution in the "5x5" branch for weight
compatibility, and the seed's version was written for 64x64 inputs only. Here:
    - Every convolution is followed by BatchNorm (`norm_layer`, as in torchvision; the
      paper predates BatchNorm and needed its auxiliary heads to train 22 layers).
      `norm_layer="none"` (e.g. `model_args: {norm_layer: none}` in a config) gives the
      paper's plain convolutions; any other name is timm's (`batchnorm`, `layernorm2d`...).
    - The 5x5 branch is a real 5x5 convolution, as in the paper.
    - Max-pools use `ceil_mode` (as torchvision), so a 32 px input still reaches inception5b
      at 1x1; 64 px gives 2x2 there, 256 px gives 8x8. Global average pooling before the
      classifier makes the head independent of the input size.
    - The auxiliary heads (off by default: `aux_logits=True`) average-pool to 4x4 with an
      adaptive pool, as torchvision does: at 224 px it gives the 4x4 grid of the paper's 5x5
      stride-3 pool (from windows 4-5 px wide, not the paper's 5), and it still works on the
      4x4 map a 64 px input gives. In training mode `forward` then returns
      `(logits, aux1, aux2)`; the paper weights the auxiliary losses by 0.3. In eval mode
      it returns the logits only.
    - `stem_stride=1` drops conv1's stride 2 (the paper's), so an S px face gets the grid a
      2S px face gets by default, from the same pixels (AlexNet's `stem_stride=2`): a 64 px
      face reaches inception3 at 16x16 and inception5b at 4x4 instead of 8x8 and 2x2.
"""

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from ._base import init_weights, resolve_norm_layer
from ._registry import build_model_with_cfg, init_classifier, register_model, scratch_cfg

__all__ = ["GoogLeNet"]

# Inception modules: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) output channels.
cfgs: dict[str, dict[str, tuple[int, int, int, int, int, int]]] = {
    "inception_v1": {
        "3a": (64, 96, 128, 16, 32, 32),
        "3b": (128, 128, 192, 32, 96, 64),
        "4a": (192, 96, 208, 16, 48, 64),
        "4b": (160, 112, 224, 24, 64, 64),
        "4c": (128, 128, 256, 24, 64, 64),
        "4d": (112, 144, 288, 32, 64, 64),
        "4e": (256, 160, 320, 32, 128, 128),
        "5a": (256, 160, 320, 32, 128, 128),
        "5b": (384, 192, 384, 48, 128, 128),
    },
}


class ConvNormAct(nn.Sequential):
    """Convolution ('same' padding for odd kernels), optional norm, activation."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        # A bias before BatchNorm is cancelled by its mean subtraction.
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2,
                              bias=norm_layer is None)
        self.bn = norm_layer(out_chs) if norm_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True)


class Inception(nn.Module):
    """Four parallel branches (1x1, 3x3, 5x5, pool), concatenated along channels.

    Args:
        in_chs: input channels.
        c1: 1x1 branch channels.
        c3_reduce: 1x1 reduction before the 3x3 convolution.
        c3: 3x3 branch channels.
        c5_reduce: 1x1 reduction before the 5x5 convolution.
        c5: 5x5 branch channels.
        pool_proj: 1x1 projection after the 3x3 max-pool.
        norm_layer: normalisation after every convolution (a module class), or None for plain ones.
        act_layer: activation after every convolution.
    """

    def __init__(
            self,
            in_chs: int,
            c1: int,
            c3_reduce: int,
            c3: int,
            c5_reduce: int,
            c5: int,
            pool_proj: int,
            norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        dd = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.out_chs = c1 + c3 + c5 + pool_proj
        self.branch1 = ConvNormAct(in_chs, c1, 1, **dd)
        self.branch2 = nn.Sequential(ConvNormAct(in_chs, c3_reduce, 1, **dd), ConvNormAct(c3_reduce, c3, 3, **dd))
        self.branch3 = nn.Sequential(ConvNormAct(in_chs, c5_reduce, 1, **dd), ConvNormAct(c5_reduce, c5, 5, **dd))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
            ConvNormAct(in_chs, pool_proj, 1, **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, dim=1)  # (B, c1 + c3 + c5 + pool_proj, H, W)


class InceptionAux(nn.Module):
    """Auxiliary classifier: pool to 4x4, 1x1 conv to 128, FC 1024, dropout, FC.

    Args:
        in_chs: input channels.
        num_classes: classifier outputs; 0 leaves `fc` as an identity.
        drop_rate: dropout before the classifier (the paper's 0.7).
        norm_layer: normalisation after the convolution, or None.
        act_layer: activation after the convolution and the hidden linear layer.
    """

    def __init__(
            self,
            in_chs: int,
            num_classes: int,
            drop_rate: float = 0.7,
            norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = ConvNormAct(in_chs, 128, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.act = act_layer(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(1024, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pool(x)).flatten(1)  # (B, 128 * 4 * 4)
        x = self.drop(self.act(self.fc1(x)))  # (B, 1024)
        return self.fc(x)  # (B, num_classes)


class GoogLeNet(nn.Module):
    """GoogLeNet / Inception v1 with optional auxiliary heads.

    Args:
        cfg: Inception module widths, see `cfgs`.
        num_classes: classifier outputs; 0 leaves `fc` as an identity.
        in_chans: input image channels.
        drop_rate: dropout before the classifier (the paper's 0.4).
        aux_logits: add the two auxiliary classifiers (after inception4a and 4d).
        aux_drop_rate: dropout in the auxiliary classifiers.
        norm_layer: normalisation after every convolution: a module class, a timm norm name
            ("batchnorm", "layernorm2d"...), or None / "none" for plain convolutions.
        act_layer: activation after every convolution.
        init_std: None for Kaiming (fan_in) init; a float draws every conv and linear from
            N(0, init_std).
        stem_stride: conv1's stride, 2 (the paper's) or 1; 'same' padding makes conv1's output
            ceil(S / stride), so stride 1 on S px equals stride 2 on 2S px for every S.
    """

    def __init__(
            self,
            cfg: dict[str, tuple[int, int, int, int, int, int]],
            num_classes: int = 2,
            in_chans: int = 3,
            drop_rate: float = 0.4,
            aux_logits: bool = False,
            aux_drop_rate: float = 0.7,
            norm_layer: Callable[..., nn.Module] | str | None = nn.BatchNorm2d,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            init_std: float | None = None,
            stem_stride: int = 2,
    ):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        norm_layer = resolve_norm_layer(norm_layer, "inception_v1")
        self.init_std = init_std
        dd = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.num_classes = num_classes
        self.aux_logits = aux_logits
        self.stem = nn.Sequential(OrderedDict(
            conv1=ConvNormAct(in_chans, 64, 7, stride=stem_stride, **dd),
            pool1=nn.MaxPool2d(3, stride=2, ceil_mode=True),
            conv2=ConvNormAct(64, 64, 1, **dd),
            conv3=ConvNormAct(64, 192, 3, **dd),
            pool2=nn.MaxPool2d(3, stride=2, ceil_mode=True),
        ))
        prev_chs = 192
        for name, widths in cfg.items():
            block = Inception(prev_chs, *widths, **dd)
            self.add_module(f"inception{name}", block)
            prev_chs = block.out_chs
        self.pool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.pool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.num_features = self.head_hidden_size = prev_chs

        if aux_logits:
            self.aux1 = InceptionAux(self.inception4a.out_chs, num_classes, aux_drop_rate, **dd)
            self.aux2 = InceptionAux(self.inception4d.out_chs, num_classes, aux_drop_rate, **dd)
        else:
            self.aux1 = self.aux2 = None
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(prev_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Kaiming (fan_in) init for convs and hidden linears, N(0, 0.01) for all classifiers;
        or N(0, init_std) for every conv and linear."""
        # fan_in, not the fan_out used elsewhere in rvf: the 1x1 reductions (832 -> 48 channels)
        # would amplify the signal ~100x by inception5b with fan_out, which BatchNorm hides in
        # training but running statistics and norm_layer=None do not.
        init_weights(self, conv_mode="fan_in", std=self.init_std)
        for head in (self.aux1, self.aux2):
            if head is not None and self.init_std is None:
                init_classifier(head.fc)

    def get_classifier(self) -> nn.Module:
        """Return the final linear layer (the auxiliary heads have their own `fc`)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (and auxiliary ones) with fresh ones of `num_classes` outputs."""
        self.num_classes = num_classes
        for head, in_features in ((self, self.head_hidden_size), (self.aux1, 1024), (self.aux2, 1024)):
            if head is None:
                continue
            head.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
            init_classifier(head.fc)

    def _forward_features(self, x: torch.Tensor, with_aux: bool = False):
        """Return the inception5b map and the auxiliary logits (None unless `with_aux`)."""
        aux1 = aux2 = None
        # Sizes below are for stem_stride 2; with 1, every map is twice as wide and high.
        x = self.stem(x)  # (B, 192, H/8, W/8)
        x = self.inception3a(x)  # (B, 256, H/8, W/8)
        x = self.inception3b(x)  # (B, 480, H/8, W/8)
        x = self.pool3(x)  # (B, 480, H/16, W/16)
        x = self.inception4a(x)  # (B, 512, H/16, W/16)
        if with_aux:
            aux1 = self.aux1(x)  # (B, num_classes)
        x = self.inception4b(x)  # (B, 512, H/16, W/16)
        x = self.inception4c(x)  # (B, 512, H/16, W/16)
        x = self.inception4d(x)  # (B, 528, H/16, W/16)
        if with_aux:
            aux2 = self.aux2(x)  # (B, num_classes)
        x = self.inception4e(x)  # (B, 832, H/16, W/16)
        x = self.pool4(x)  # (B, 832, H/32, W/32)
        x = self.inception5a(x)  # (B, 832, H/32, W/32)
        x = self.inception5b(x)  # (B, 1024, H/32, W/32)
        return x, aux1, aux2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the inception5b feature map, (B, 1024, H/32, W/32) (sizes rounded up; H/16 with
        `stem_stride=1`)."""
        return self._forward_features(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Map a feature map to logits (or to the pooled features if `pre_logits`)."""
        x = self.global_pool(x).flatten(1)  # (B, 1024)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return logits, or `(logits, aux1, aux2)` in training mode with `aux_logits`."""
        with_aux = self.aux_logits and self.training
        x, aux1, aux2 = self._forward_features(x, with_aux=with_aux)
        x = self.forward_head(x)  # (B, num_classes)
        return (x, aux1, aux2) if with_aux else x


def _create_inception(variant: str, pretrained: bool = False, **kwargs) -> GoogLeNet:
    pretrained_cfg = default_cfgs[variant]
    if kwargs.get("aux_logits"):
        # The auxiliary classifiers are sized by num_classes too: a weights file with another
        # number of classes re-initialises them along with `fc`.
        pretrained_cfg = dict(pretrained_cfg, classifier=("fc", "aux1.fc", "aux2.fc"))
    return build_model_with_cfg(GoogLeNet, variant, pretrained, pretrained_cfg, cfg=cfgs[variant], **kwargs)


# The auxiliary heads only train: a weights file with or without them fits a model without or with.
default_cfgs = {"inception_v1": scratch_cfg("inception5b", train_only=("aux1", "aux2"))}


@register_model
def inception_v1(pretrained: bool = False, **kwargs) -> GoogLeNet:
    """GoogLeNet (Szegedy et al., 2014) with BatchNorm; auxiliary heads via `aux_logits=True`."""
    return _create_inception("inception_v1", pretrained, **kwargs)
