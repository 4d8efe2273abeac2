"""Tests for the model factory: every registered model, the timm: path and weights files."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from rvf.models import _registry, create_model, get_cam_layer, is_model, list_models, register_model
from rvf.models._base import CoordChannels, HighPassResiduals

MODEL_NAMES = list_models()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cam_output_shape(model: nn.Module, x: torch.Tensor) -> tuple[torch.Size, torch.Tensor]:
    """Run `model(x)` and return the shape of the Grad-CAM layer's output and the logits."""
    shapes = []
    handle = get_cam_layer(model).register_forward_hook(lambda mod, inp, out: shapes.append(out.shape))
    try:
        y = model(x)
    finally:
        handle.remove()
    return shapes[-1], y


def test_registry_lists_the_seven_models():
    assert MODEL_NAMES == ["alexnet", "alexnet_bn", "inception_v1", "lenet", "resnet50", "vgg16", "vgg16_bn"]
    assert list_models("vgg*") == ["vgg16", "vgg16_bn"]


@pytest.mark.parametrize("name", MODEL_NAMES)
@torch.no_grad()
def test_model_forward_any_size(name):
    model = create_model(name).eval()
    for size in (32, 64, 256):
        cam_shape, y = _cam_output_shape(model, torch.randn(2, 3, size, size))
        assert y.shape == (2, model.num_classes) == (2, 2)
        assert torch.isfinite(y).all()
        assert len(cam_shape) == 4 and cam_shape[0] == 2, f"Grad-CAM layer output {cam_shape} at {size}px"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_backward(name):
    model = create_model(name, num_classes=3).train()
    y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 3)
    F.cross_entropy(y, torch.tensor([0, 2])).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["fc.weight"].abs().sum() > 0
    first_conv = next(g for n, g in grads.items() if g.dim() == 4)
    assert first_conv.abs().sum() > 0, "no gradient reaches the first convolution"


@torch.no_grad()
def test_plain_vgg16_keeps_the_signal_at_init():
    # Without BatchNorm, an init that shrinks activations layer by layer lets Adam's first
    # bias updates swamp the input: plain VGG16 with fan_out init sat near chance on rvf10k.
    # (AlexNet's five fan_out convs shrink it to ~0.12 and it learns; thirteen do not.)
    name = "vgg16"
    model = create_model(name).eval()
    stds = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: stds.append(out.std().item()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    model.forward_features(torch.randn(16, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert 0.3 < stds[-1] < 5, f"{name}: std of the last conv activation at init is {stds[-1]:.3f}"


@pytest.mark.parametrize("name", MODEL_NAMES)
@torch.no_grad()
def test_model_interface(name):
    model = create_model(name, in_chans=1, drop_rate=0.1).eval()
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 64, 64) and cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["architecture"] == name
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])

    x = torch.randn(2, 1, 64, 64)
    features = model.forward_features(x)
    assert features.dim() == 4 and features.shape[1] == model.num_features
    assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
    assert torch.equal(model.forward_head(features), model(x))

    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)


def test_inception_aux_logits():
    model = create_model("inception_v1", aux_logits=True).train()
    outputs = model(torch.randn(2, 3, 64, 64))
    assert [o.shape for o in outputs] == [(2, 2)] * 3
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 2)


@torch.no_grad()
def test_inception_norm_layer_by_name():
    # A YAML config picks the paper's plain convolutions with `model_args: {norm_layer: none}`.
    plain = create_model("inception_v1", norm_layer="none").eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    bn = create_model("inception_v1", norm_layer="batchnorm")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 57
    # fan_in init keeps the plain net's signal alive through 22 layers, as for plain VGG16.
    feats = plain.forward_features(torch.randn(8, 3, 64, 64))
    assert 0.1 < feats.std().item() < 10
    with pytest.raises(ValueError, match="unknown norm_layer 'bogus'"):
        create_model("inception_v1", norm_layer="bogus")
    # The same names for AlexNet and VGG (a string was "'str' object is not callable")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in create_model("vgg16", norm_layer="batchnorm").modules()) == 13
    assert not any(isinstance(m, nn.BatchNorm2d) for m in create_model("alexnet", norm_layer="none").modules())


@pytest.mark.parametrize("name, kwargs, message", [
    ("lenet", {"num_classes": -1}, "num_classes must be a whole number >= 0"),
    ("lenet", {"num_classes": 2.5}, "num_classes must be a whole number >= 0"),
    ("vgg16_bn", {"init_std": 0}, "init_std must be a number between 0 and 1"),  # all-zero weights
    ("inception_v1", {"init_std": 1e6}, "init_std must be a number between 0 and 1"),  # NaN logits
    ("vgg16", {"init_std": 0.01}, "init_std is for vgg16_bn"),
    ("vgg16", {"first_pool": "no"}, "first_pool must be true or false, got 'no'"),
    ("alexnet", {"stem_stride": "2"}, "stem_stride must be 2 or 4, got '2'"),
    ("timm:hf-hub:timm/resnet18.a1_in1k", {}, "rvf takes a timm architecture name"),
])
def test_bad_model_arguments_are_named(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **kwargs)


def test_num_classes_null_means_the_default():  # `model_args: {num_classes: null}`, as any option
    assert create_model("lenet", num_classes=None).num_classes == 2
    assert create_model("timm:resnet18", num_classes=None).num_classes == 2


@pytest.mark.parametrize("name", ["inception_v1", "vgg16_bn"])
def test_init_std_draws_every_conv_and_linear_from_one_normal(name):
    """`model_args: {init_std: 0.01}` is torchvision's GoogLeNet init; the default stays Kaiming."""
    small = create_model(name, init_std=0.01)
    weights = [m.weight for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(abs(w.std().item() - 0.01) < 0.002 for w in weights if w.numel() >= 1000)
    assert all(m.weight.eq(1).all() and m.bias.eq(0).all() for m in small.modules() if isinstance(m, nn.BatchNorm2d))
    # Kaiming: a conv's std is sqrt(2 / fan_in), e.g. 0.27 for the 3x3x3 first conv of VGG.
    default = create_model(name)
    first = next(m for m in default.modules() if isinstance(m, nn.Conv2d))
    fan_in = first.weight[0].numel()
    assert first.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15)
    assert default.fc.weight.std().item() == pytest.approx(0.01, rel=0.3)  # init_classifier


@torch.no_grad()
def test_alexnet_space_to_depth_reads_native_pixels_at_half_the_grid():
    """`space_to_depth: 2` gives a 256 px face a 128 px face's conv grid, yet conv1 still sees
    the detail a 2x resize would average away."""
    s2d = create_model("alexnet_bn", space_to_depth=2).eval()
    plain = create_model("alexnet_bn").eval()
    conv1 = next(m for m in s2d.modules() if isinstance(m, nn.Conv2d))
    assert conv1.in_channels == 12
    x = torch.randn(2, 3, 256, 256)
    assert s2d.forward_features(x).shape == plain.forward_features(x[..., ::2, ::2]).shape == (2, 256, 7, 7)
    # A 2x2 checkerboard has zero mean over every 2x2 block: invisible at 128 px, not here.
    checker = (torch.arange(256)[:, None] + torch.arange(256)[None, :]) % 2 * 2.0 - 1
    assert F.avg_pool2d(x + checker, 2).allclose(F.avg_pool2d(x, 2), atol=1e-5)
    assert not s2d(x + checker).allclose(s2d(x), atol=1e-3)
    with pytest.raises(ValueError, match="space_to_depth must be >= 1, got 0"):
        create_model("alexnet", space_to_depth=0)


@torch.no_grad()
def test_alexnet_stem_stride_gives_twice_the_input_grid():
    """`stem_stride: 2` gives an S px face the conv grid a 2S px face gets, for every even S."""
    half = create_model("alexnet_bn", stem_stride=2).eval()
    plain = create_model("alexnet_bn").eval()
    assert half.features[0].stride == (2, 2) and half.features[0].padding == (4, 4)
    assert plain.features[0].stride == (4, 4) and plain.features[0].padding == (2, 2)
    for size in (64, 70, 128, 256):
        assert half.forward_features(torch.randn(1, 3, size, size)).shape == \
            plain.forward_features(torch.randn(1, 3, 2 * size, 2 * size)).shape
    with pytest.raises(ValueError, match="stem_stride must be 2 or 4, got 3"):
        create_model("alexnet", stem_stride=3)


@torch.no_grad()
@pytest.mark.parametrize("name, conv1, features_at_64", [
    ("inception_v1", lambda m: m.stem.conv1.conv, (1, 1024, 4, 4)),
    ("resnet50", lambda m: m.conv1, (1, 2048, 4, 4)),
])
def test_stem_stride_1_gives_twice_the_input_grid(name, conv1, features_at_64):
    """`stem_stride: 1` gives an S px face the grid a 2S px face gets at the paper's stride 2,
    with the same parameters and the same head."""
    full = create_model(name, stem_stride=1).eval()
    plain = create_model(name).eval()
    assert conv1(full).stride == (1, 1) and conv1(plain).stride == (2, 2)
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in plain.parameters())
    for size in (32, 64, 70):
        assert full.forward_features(torch.randn(1, 3, size, size)).shape == \
            plain.forward_features(torch.randn(1, 3, 2 * size, 2 * size)).shape
    assert full.forward_features(torch.randn(1, 3, 64, 64)).shape == features_at_64
    assert full(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2, got 4"):
        create_model(name, stem_stride=4)


@torch.no_grad()
def test_vgg_without_first_pool_runs_later_blocks_on_twice_the_grid():
    """`first_pool: false` gives blocks 2-5 of an S px face the grid a 2S px face gets, with
    the same parameters (only a pool, which has none, is dropped)."""
    nopool = create_model("vgg16_bn", first_pool=False).eval()
    plain = create_model("vgg16_bn").eval()
    assert sum(isinstance(m, nn.MaxPool2d) for m in nopool.features) == 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in plain.features) == 4
    assert nopool.state_dict().keys() != plain.state_dict().keys()  # indices shift past the pool
    assert [p.shape for p in nopool.parameters()] == [p.shape for p in plain.parameters()]
    for size in (32, 64, 96):
        assert nopool.forward_features(torch.randn(1, 3, size, size)).shape == \
            plain.forward_features(torch.randn(1, 3, 2 * size, 2 * size)).shape
    assert nopool(torch.randn(2, 3, 64, 64)).shape == (2, 2)


@torch.no_grad()
def test_alexnet_highpass_appends_fixed_residuals():
    """`highpass: true` feeds conv1 the image plus its high-pass residuals: zero on flat or
    linear shading, non-zero on a one-pixel checkerboard, and never trained or saved."""
    model = create_model("alexnet_bn", highpass=True).eval()
    stem = model.features[0]
    assert isinstance(stem, HighPassResiduals) and model.features[1].in_channels == 12
    ramp = torch.linspace(-1, 1, 64).expand(1, 3, 64, 64)  # linear shading: no residual
    assert stem.residuals(ramp)[..., 2:-2, 2:-2].abs().max() < 1e-6
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2.0 - 1).expand(1, 3, 64, 64)
    res = stem.residuals(checker)
    assert res.shape == (1, 9, 64, 64) and (res[..., 2:-2, 2:-2].abs().amax(dim=(-2, -1)) > 0.5).all()
    # Each residual channel reads only its own colour channel.
    red_only = torch.zeros(1, 3, 64, 64)
    red_only[:, 0] = checker[:, 0]
    assert stem.residuals(red_only)[:, 3:].abs().max() == 0
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)
    # Trainable extras: conv1's 9 new input channels (11x11, 64 filters) and the BatchNorm.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) - count(create_model("alexnet_bn")) == 9 * 64 * 11 * 11 + 2 * 9
    assert not any(k.startswith("features.0.weight") for k in model.state_dict())


@torch.no_grad()
def test_coord_channels_give_each_pixel_its_position():
    """x and y at pixel centres, in (-1, 1), symmetric about the middle, in the input's dtype,
    for any size; the image channels pass through untouched."""
    image = torch.randn(2, 3, 6, 10, dtype=torch.bfloat16)
    out = CoordChannels()(image)
    assert out.shape == (2, 5, 6, 10) and out.dtype == torch.bfloat16 and torch.equal(out[:, :3], image)
    xs, ys = out[0, 3].float(), out[0, 4].float()
    assert torch.allclose(xs[0], torch.linspace(-0.9, 0.9, 10), atol=1e-2) and (xs == xs[:1]).all()
    assert torch.allclose(ys[:, 0], torch.linspace(-5 / 6, 5 / 6, 6), atol=1e-2) and (ys == ys[:, :1]).all()
    assert torch.equal(out[1, 3:], out[0, 3:])
    assert torch.allclose(xs.flip(-1), -xs, atol=1e-2)  # a mirrored face sees mirrored x


@pytest.mark.parametrize("name", ["alexnet_bn", "vgg16_bn"])
@torch.no_grad()
def test_coords_let_the_first_conv_see_where_it_is(name):
    """`coords: true`: on a blank image the first conv answers the same everywhere away from
    the border without coordinates, and differently at each place with them."""
    plain, coords = create_model(name).eval(), create_model(name, coords=True).eval()
    assert isinstance(coords.features[0], CoordChannels) and coords.features[1].in_channels == 5
    conv = coords.features[1]
    assert sum(p.numel() for p in coords.parameters()) - sum(p.numel() for p in plain.parameters()) == \
        2 * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert plain.state_dict().keys() != coords.state_dict().keys()  # conv1 moved to features.1
    assert len(coords.state_dict()) == len(plain.state_dict())  # no stored grid
    blank = torch.zeros(1, 3, 64, 64)
    inner = lambda m: m.features[:2](blank)[..., 2:-2, 2:-2]  # noqa: E731  (B, 64, h, w) off the padding
    assert inner(plain).std(dim=(-2, -1)).max() < 1e-6
    assert (inner(coords).std(dim=(-2, -1)) > 1e-3).float().mean() > 0.9
    assert coords(torch.randn(2, 3, 48, 80)).shape == (2, 2)
    both = create_model("alexnet_bn", coords=True, highpass=True)
    assert both.features[2].in_channels == 14  # 3 + 9 residuals + x, y


def test_none_kwargs_are_dropped():
    model = create_model("lenet", drop_rate=None, in_chans=None)
    assert model.head_drop.p == 0.0 and model.features[0].in_channels == 3


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown model 'vgg17'") as e:
        create_model("vgg17")
    for name in MODEL_NAMES:
        assert name in str(e.value)
    assert "timm:" in str(e.value)


def test_timm_name_without_prefix_suggests_prefix():
    with pytest.raises(ValueError, match="timm:efficientnet_b0"):
        create_model("efficientnet_b0")


def test_is_model():
    assert is_model("lenet") and is_model("timm:resnet18") and is_model("timm:resnet18.a1_in1k")
    assert not is_model("resnet18") and not is_model("timm:lenet") and not is_model("nope")


def test_register_model_warns_on_overwrite(monkeypatch):
    monkeypatch.setattr(_registry, "_model_entrypoints", dict(_registry._model_entrypoints))

    def tiny_test_model(pretrained=False, num_classes=2, **kwargs):
        return nn.Linear(4, num_classes)

    register_model(tiny_test_model)
    assert "tiny_test_model" in list_models() and create_model("tiny_test_model", num_classes=3).out_features == 3
    with pytest.warns(UserWarning, match="Overwriting tiny_test_model"):
        register_model(tiny_test_model)


@pytest.mark.parametrize("name, kwargs", [("lenet", {}), ("inception_v1", {"aux_logits": True})])
def test_scratch_pretrained_file(tmp_path, name, kwargs):
    src = create_model(name, num_classes=3, **kwargs)
    path = tmp_path / "weights.safetensors"
    save_file(src.state_dict(), str(path))

    same = create_model(name, num_classes=3, pretrained_file=path, **kwargs)
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k

    other = create_model(name, num_classes=2, pretrained_file=path, **kwargs)
    assert other.get_classifier().out_features == 2
    classifiers = other.pretrained_cfg["classifier"]
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    for k, v in src.state_dict().items():
        if not any(k.startswith(c + ".") for c in classifiers):
            assert torch.equal(other.state_dict()[k], v), k


def test_scratch_pretrained_torch_file(tmp_path):
    src = create_model("lenet")
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    model = create_model("lenet", pretrained_file=path)
    assert torch.equal(model.features[0].weight, src.features[0].weight)


@pytest.mark.parametrize("saved, loaded", [
    ({"name": "inception_v1", "aux_logits": True}, {"name": "inception_v1"}),  # the heads only train
    ({"name": "inception_v1"}, {"name": "inception_v1", "aux_logits": True}),
    ({"name": "lenet", "num_classes": 0}, {"name": "lenet"}),  # a features-only save
])
def test_weights_fit_a_model_with_or_without_its_heads(tmp_path, saved, loaded):
    path = tmp_path / "weights.safetensors"
    source = create_model(saved.pop("name"), **saved)
    save_file(source.state_dict(), str(path))
    model = create_model(loaded.pop("name"), pretrained_file=path, **loaded)
    shared = {k: v for k, v in source.state_dict().items() if k in model.state_dict()
              and not k.startswith(("fc.", "aux"))}
    assert shared and all(torch.equal(model.state_dict()[k], v) for k, v in shared.items())


def test_scratch_pretrained_file_must_match_backbone(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(create_model("lenet").state_dict(), str(path))
    with pytest.raises(RuntimeError, match="size mismatch"):
        create_model("lenet", in_chans=1, pretrained_file=path)


def test_scratch_pretrained_needs_a_file(tmp_path):
    with pytest.raises(RuntimeError, match="pretrained_file"):
        create_model("vgg16", pretrained=True)
    with pytest.raises(FileNotFoundError):
        create_model("lenet", pretrained_file=tmp_path / "missing.safetensors")


@torch.no_grad()
def test_timm_model():
    model = create_model("timm:resnet18", num_classes=3).eval()
    assert model.num_classes == 3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert "input_size" in model.pretrained_cfg


def test_timm_pretrained_file(tmp_path):
    src = create_model("timm:test_resnet", num_classes=1000)
    path = tmp_path / "test_resnet.safetensors"
    save_file(src.state_dict(), str(path))

    model = create_model("timm:test_resnet", num_classes=2, pretrained_file=path)
    assert model.get_classifier().out_features == 2
    loaded = model.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k


def test_timm_unknown_name():
    with pytest.raises(ValueError, match="Unknown timm model 'resnet_18'.*timm:resnet18"):
        create_model("timm:resnet_18")


def test_timm_download_failure_suggests_pretrained_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="pretrained_file=") as e:
        create_model("timm:resnet18", pretrained=True)
    assert isinstance(e.value.__cause__, OSError)


@pytest.mark.parametrize("name, module", [
    ("resnet18", "layer4"), ("efficientnet_b0", "blocks.6"), ("convnext_nano", "stages.3"), ("test_resnet", "layer4"),
])
@torch.no_grad()
def test_timm_cam_layer(name, module):
    model = create_model(f"timm:{name}").eval()
    assert get_cam_layer(model) is model.get_submodule(module)
    cam_shape, _ = _cam_output_shape(model, torch.randn(1, 3, 64, 64))
    assert len(cam_shape) == 4


def test_cam_layer_fallback_without_feature_info():
    model = create_model("timm:test_resnet")
    del model.feature_info
    assert get_cam_layer(model) is model.layer4

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.body = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(inplace=True))

        def forward_features(self, x):
            return self.body(self.stem(x))

    tiny = Tiny()
    assert get_cam_layer(tiny) is tiny.body  # the outermost module that outputs the features
    with pytest.raises(ValueError, match="forward_features"):
        get_cam_layer(nn.Linear(2, 2))


def _config_models() -> list[tuple[str, dict]]:
    from rvf.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfgs = [load_config(p) for p in sorted((root / "configs").glob("*.yaml"))]
    found = {(c.model, json.dumps(c.model_args, sort_keys=True)) for c in cfgs if not c.pretrained}
    # ...and the options no config sets yet: a head that only trains, a pool taken out.
    extra = [("inception_v1", {"aux_logits": True}), ("vgg16_bn", {"first_pool": False})]
    return [(name, json.loads(args)) for name, args in sorted(found)] + extra


@pytest.mark.parametrize("name, model_args", _config_models(), ids=lambda v: v if isinstance(v, str) else str(v))
def test_every_config_model_survives_a_checkpoint_round_trip(tmp_path, name, model_args):
    # model.json alone rebuilds the model: its model_args (stem strides, first_pool, init_std,
    # dropout, aux heads), BatchNorm running statistics and every buffer come back, same eval outputs.
    from rvf.checkpoint import load_pretrained, save_pretrained
    from rvf.data.transforms import resolve_data_config

    model_args = {"num_classes": 2, **model_args}
    model = create_model(name, **model_args)
    for m in model.modules():  # as after training: statistics no fresh model has
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    meta = {"model_name": name, "model_args": model_args, "classes": ["fake", "real"],
            "data_config": resolve_data_config(model, image_size=64).to_dict()}
    loaded, _, _ = load_pretrained(save_pretrained(tmp_path, model, meta))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
