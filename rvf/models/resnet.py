"""ResNet.

Paper: `Deep Residual Learning for Image Recognition` - He et al., 2015, in the "v1.5" form
of torchvision's and timm's `resnet.py` (stride on the 3x3 convolution of a bottleneck,
not the first 1x1). Names follow timm (`conv1`, `bn1`, `act1`, `layer1`-`layer4`, `fc`).

Written here rather than wrapped: `timm:resnet50` is the way to get ImageNet weights; this
scratch `resnet50` is the seed's comparison model, whose version was written for 64x64
inputs only. Its checkpoints must keep loading by key name whatever timm's ResNet class
becomes, and all seven rvf models share one head and init convention. Architecture:
    - The paper's stem and stages, unchanged. At 64 px layer4 is 2x2 (32 px: 1x1); global
      average pooling makes the head independent of the input size.
    - `stem_stride=1` drops conv1's stride 2 (the paper's), so an S px face gets the grid a
      2S px face gets by default, from the same pixels (as Inception v1's and AlexNet's
      options do): a 64 px face reaches layer1 at 32x32 and layer4 at 4x4 instead of 16x16
      and 2x2, for 4x the multiply-adds and the same parameters.
    - Kaiming-normal (fan_out) init for convs, and the last BatchNorm of each bottleneck
      starts at zero (Goyal et al., 2017, `zero_init_last`): every block then starts as the
      identity, so the 16-block network trains like a shallow one at first, which matters
      when training from scratch.
"""

from collections.abc import Callable

import torch
from torch import nn

from ._base import ClassifierMixin
from ._registry import build_model_with_cfg, init_classifier, register_model, scratch_cfg

__all__ = ["ResNet", "Bottleneck"]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand by 4, plus the shortcut.

    Args:
        in_chs: input channels.
        planes: channels of the 3x3 convolution; the block outputs `4 * planes`.
        stride: stride of the 3x3 convolution.
        downsample: projection for the shortcut when shape changes, else None.
        norm_layer: normalisation after every convolution.
        act_layer: activation.
    """

    expansion = 4

    def __init__(
            self,
            in_chs: int,
            planes: int,
            stride: int = 1,
            downsample: nn.Module | None = None,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.act2 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, kernel_size=1, bias=False)
        self.bn3 = norm_layer(out_chs)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        """Start the residual branch at zero, so the block starts as the identity."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, 4 * planes, H/s, W/s)
        x = self.act1(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        x = self.act2(self.bn2(self.conv2(x)))  # (B, planes, H/s, W/s)
        x = self.bn3(self.conv3(x))  # (B, 4 * planes, H/s, W/s)
        return self.act3(x + shortcut)


class ResNet(ClassifierMixin, nn.Module):
    """ResNet with a 7x7 stem, four stages and global average pooling.

    Args:
        block: residual block class (`Bottleneck`).
        layers: number of blocks in each of the four stages.
        num_classes: classifier outputs; 0 leaves `fc` as an identity.
        in_chans: input image channels.
        drop_rate: dropout before the classifier.
        zero_init_last: zero the last norm weight of every block.
        norm_layer: normalisation after every convolution.
        act_layer: activation.
        stem_stride: conv1's stride, 2 (the paper's) or 1; padding 3 makes conv1's output
            ceil(S / stride), so stride 1 on S px equals stride 2 on 2S px for every S.
    """

    def __init__(
            self,
            block: type[Bottleneck],
            layers: tuple[int, int, int, int],
            num_classes: int = 2,
            in_chans: int = 3,
            drop_rate: float = 0.0,
            zero_init_last: bool = True,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
            act_layer: Callable[..., nn.Module] = nn.ReLU,
            stem_stride: int = 2,
    ):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_chs = 64
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            out_chs = planes * block.expansion
            downsample = None
            if stride != 1 or in_chs != out_chs:
                downsample = nn.Sequential(
                    nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                    norm_layer(out_chs),
                )
            dd = dict(norm_layer=norm_layer, act_layer=act_layer)
            blocks = [block(in_chs, planes, stride, downsample, **dd)]
            blocks += [block(out_chs, planes, **dd) for _ in range(num_blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_chs = out_chs
        self.num_features = self.head_hidden_size = in_chs

        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(zero_init_last=zero_init_last)

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Kaiming init for convs, N(0, 0.01) for the classifier, optionally zero last BN of blocks."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan_out keeps the gradient scale steady through ReLU layers going backwards.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        init_classifier(self.fc)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()


    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the layer4 feature map, (B, 2048, H/32, W/32) (H/16, W/16 with
        `stem_stride=1`)."""
        # Sizes below are for stem_stride 2; with 1, every map is twice as wide and high.
        x = self.act1(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = self.maxpool(x)  # (B, 64, H/4, W/4)
        x = self.layer1(x)  # (B, 256, H/4, W/4)
        x = self.layer2(x)  # (B, 512, H/8, W/8)
        x = self.layer3(x)  # (B, 1024, H/16, W/16)
        return self.layer4(x)  # (B, 2048, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Map a feature map to logits (or to the pooled features if `pre_logits`)."""
        x = self.global_pool(x).flatten(1)  # (B, 2048)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)  # (B, num_classes)


def _create_resnet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    return build_model_with_cfg(ResNet, variant, pretrained, default_cfgs[variant], **kwargs)


default_cfgs = {"resnet50": scratch_cfg("layer4")}


@register_model
def resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 (He et al., 2015), v1.5 strides, zero-initialised last BN per block."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)
    return _create_resnet("resnet50", pretrained, **model_args)
