"""What the scratch models share: timm's classifier interface and one init recipe."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "AdaptiveMaxPool2d", "ClassifierMixin", "CoordChannels", "HighPassResiduals", "init_classifier", "init_weights",
    "mlp_pre_logits", "resolve_norm_layer",
]


class AdaptiveMaxPool2d(nn.AdaptiveMaxPool2d):
    """`nn.AdaptiveMaxPool2d` that returns a map already at the output size untouched.

    The head pools to the grid the model was designed on (LeNet's 13x13 at 64 px), so at the
    design size the pool is an identity, yet torch still runs it: on LeNet at 64 px that is
    ~1 ms of a ~26 ms CPU step, forward and backward. Same values and gradients either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size,) * 2
        # Tracing (TorchScript, ONNX) records shapes as tensors: keep the plain pool there.
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) == tuple(size):
            return x
        return super().forward(x)


class HighPassResiduals(nn.Module):
    """Append fixed high-pass residuals of each colour channel to the image (`C -> 4C` channels).

    Image forensics reads noise, not content: Fridrich and Kodovsky's rich models (SRM, 2012)
    and the GAN-face detectors built on them (Mo et al. 2018; Zhou et al. 2018 use these three
    kernels) filter the image with fixed high-pass kernels so the network starts from the
    residual, where upsampling and checkerboard traces live, instead of having to learn such
    filters from a few thousand faces. The kernels are second-order (3x3 "square", the
    horizontal "edge") and 5x5 KV, each summing to zero, so a flat region gives 0; each is
    applied to every channel on its own. A BatchNorm brings the residuals (std 0.06-0.13 against
    the normalised image's 1.07 on 128 px rvf10k faces) to the image's scale before the first
    conv mixes them. The kernels are a non-persistent buffer, so they never train and
    checkpoints do not carry them.
    """

    kernels = (
        ((0, 0, 0, 0, 0), (0, -1, 2, -1, 0), (0, 2, -4, 2, 0), (0, -1, 2, -1, 0), (0, 0, 0, 0, 0)),
        ((-1, 2, -2, 2, -1), (2, -6, 8, -6, 2), (-2, 8, -12, 8, -2), (2, -6, 8, -6, 2), (-1, 2, -2, 2, -1)),
        ((0, 0, 0, 0, 0), (0, 0, 0, 0, 0), (0, 1, -2, 1, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)),
    )
    scales = (4.0, 12.0, 2.0)

    def __init__(self, in_chans: int = 3):
        super().__init__()
        k = torch.tensor(self.kernels, dtype=torch.float32) / torch.tensor(self.scales).view(-1, 1, 1)
        # Grouped conv: output channel j filters input channel j // 3 with kernel j % 3.
        self.register_buffer("weight", k.repeat(in_chans, 1, 1).unsqueeze(1), persistent=False)
        self.in_chans = in_chans
        self.out_chans = in_chans * (1 + len(self.kernels))
        self.norm = nn.BatchNorm2d(in_chans * len(self.kernels))

    def residuals(self, x: torch.Tensor) -> torch.Tensor:
        """The raw high-pass residuals, (B, 3C, H, W), before the BatchNorm."""
        return nn.functional.conv2d(x, self.weight.to(x.dtype), padding=2, groups=self.in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.norm(self.residuals(x))], dim=1)


class CoordChannels(nn.Module):
    """Append each pixel's position to the image, x and y in [-1, 1] (`C -> C + 2` channels).

    CoordConv (Liu et al. 2018, "An intriguing failing of convolutional neural networks and the
    CoordConv solution"): a convolution does not know where it is, yet on rvf10k where a face
    sits is evidence. FFHQ's real faces and StyleGAN's fakes are both aligned on the eyes, the
    fakes more tightly: on 128 px train faces, the shift that best fits the mean face's eye band
    has a std of 0.95 / 1.28 px (rows / columns) for fakes against 1.41 / 1.91 px for reals, and
    its length alone ranks them with ROC AUC 0.63 (benchmarks/alignment.py). With two coordinate
    channels conv1 can tie a feature to an absolute place instead of leaving deeper layers to
    infer it from the zero padding. Measured, the gain is within seed noise (docs/experiments.md,
    session 22): CNNs with zero padding already know much of where they are.

    The channels are made from the input's own size on every call, so any image size works and
    nothing is stored in checkpoints; they span the normalised image's range.
    """

    out_extra = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # Pixel centres, so the grid is symmetric: a mirrored face sees mirrored x.
        ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) * (2 / h) - 1  # (H,)
        xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) * (2 / w) - 1  # (W,)
        grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])  # (2, H, W)
        return torch.cat([x, grid.unsqueeze(0).expand(b, 2, h, w)], dim=1)  # (B, C + 2, H, W)


def mlp_pre_logits(
        in_features: int, hidden_size: int, act_layer: Callable[..., nn.Module], drop_rate: float,
) -> nn.Sequential:
    """The two hidden layers of AlexNet's and VGG's head: linear, act, dropout, linear, act.

    The dropout after the second layer is the model's own `head_drop`, which `forward_head`
    applies before `fc` (timm's layout). The module indices (`pre_logits.0`, `pre_logits.3`) are
    the checkpoints' keys: keep this order.
    """
    return nn.Sequential(
        nn.Linear(in_features, hidden_size),
        act_layer(inplace=True),
        nn.Dropout(drop_rate),
        nn.Linear(hidden_size, hidden_size),
        act_layer(inplace=True),
    )


@torch.no_grad()
def init_classifier(fc: nn.Module) -> None:
    """Give a linear classifier N(0, 0.01) weights and zero bias (no-op for an identity).

    Small weights make the first predictions near-uniform (loss near log(C)) whatever the
    features' scale, as in torchvision's and timm's inits.
    """
    if isinstance(fc, nn.Linear):
        nn.init.normal_(fc.weight, 0, 0.01)
        nn.init.zeros_(fc.bias)


def resolve_norm_layer(norm_layer, model: str):
    """A `norm_layer` argument as a module class: a class as is, a timm norm name looked up, "none" None.

    A string lets a YAML config choose (`model_args: {norm_layer: none}`): `create_model`
    drops kwargs that are None, so None itself cannot travel through `model_args`. The layer
    is built from a channel count alone, so "groupnorm" (32 groups) fits only layers whose
    width 32 divides.
    """
    if not isinstance(norm_layer, str):
        return norm_layer
    if norm_layer.lower() in ("", "none"):
        return None
    from timm.layers import get_norm_layer

    try:
        return get_norm_layer(norm_layer)
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"{model}: unknown norm_layer {norm_layer!r} (use 'none', 'batchnorm', 'layernorm2d' "
                         f"or another timm norm name)") from e


@torch.no_grad()
def init_weights(model: nn.Module, conv_mode: str = "fan_out", std: float | None = None) -> None:
    """Kaiming for convs (`conv_mode`) and hidden linears (fan_in), BN as identity, and
    `init_classifier` for `model.fc`; or, with `std`, N(0, std) for every conv and linear.

    fan_out (torchvision's choice) keeps the gradient's scale steady going backwards; fan_in
    keeps the activations' scale going forwards, which is what a deep stack without BN needs
    (plain VGG16 passes "fan_in", see rvf.models.vgg). Hidden linears get Kaiming fan_in rather
    than torchvision's N(0, 0.01), which suits 4096-wide layers but shrinks the signal ~3x
    per 1024-wide layer (and ~10x per LeNet layer) and made training start visibly slower.

    `std` (e.g. 0.01, torchvision's GoogLeNet init) is for networks with BatchNorm after every
    convolution, where a conv's output does not depend on its weights' scale but its learning
    does: Adam moves each weight by about lr per step whatever its size, so weights several
    times smaller than Kaiming's change several times faster relative to themselves, as a
    larger learning rate would. Under the seed's protocol (Adam 1e-4) that is what keeps
    Inception v1 from memorising the training set in five epochs (see configs/inception_v1.yaml).
    """
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < 1):
        raise ValueError(f"init_std must be a number between 0 and 1 (e.g. 0.01), got {std!r}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and std is not None:
            nn.init.normal_(m.weight, 0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    if std is None:
        init_classifier(model.fc)


class ClassifierMixin:
    """timm's classifier interface for a model with one head `fc` fed by `head_hidden_size`
    features, and `forward` = `forward_head(forward_features(x))`. The default `forward_head`
    is the pooled-MLP head of LeNet, AlexNet and VGG; ResNet overrides it."""

    fc: nn.Module
    head_hidden_size: int
    num_classes: int

    def get_classifier(self) -> nn.Module:
        """Return the final linear layer."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one of `num_classes` outputs (0: identity)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        init_classifier(self.fc)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Map a feature map to logits (or to the last hidden layer if `pre_logits`):
        `global_pool` -> flatten -> `pre_logits` (the hidden MLP) -> `head_drop` -> `fc`."""
        x = self.global_pool(x).flatten(1)  # (B, C * pool_size**2)
        x = self.pre_logits(x)  # (B, head_hidden_size)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits, (B, num_classes)."""
        return self.forward_head(self.forward_features(x))
