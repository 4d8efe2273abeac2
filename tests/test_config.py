"""The config: defaults <- YAML <- overrides, strict about keys and types."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rvf.config import RECIPE_NEUTRAL_KEYS, ConfigError, TrainConfig, load_config, parse_override, recipe_differences

ROOT = Path(__file__).resolve().parents[1]
SEED_CONFIGS = ["lenet", "alexnet", "inception_v1", "vgg16", "resnet50", "alexnet_bn", "vgg16_bn"]


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_seed_configs_are_the_seed_protocol(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert (cfg.model, cfg.image_size, cfg.batch_size, cfg.optimizer, cfg.lr) == (name, 64, 64, "adam", 1e-4)
    assert cfg.label_smoothing == 0 and cfg.hflip == 0 and cfg.scheduler == "none"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: alexnet\nlr: 0.001\nepochs: 3\ncrop_scale: [0.5, 1]\n")
    cfg = load_config(f, {"epochs": 5, "lr": 1})  # an int is a fine float
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.crop_scale) == ("alexnet", 1.0, 5, (0.5, 1.0))
    assert TrainConfig().epochs == 20  # defaults untouched


def test_scientific_notation_is_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; rvf reads it as the float everyone means."""
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-4\nweight_decay: 5E-2\ncrop_scale: [8e-1, 1]\n")
    cfg = load_config(f, dict([parse_override("min_lr=1e-6")]))
    assert (cfg.lr, cfg.weight_decay, cfg.crop_scale, cfg.min_lr) == (1e-4, 0.05, (0.8, 1.0), 1e-6)
    with pytest.raises(ConfigError, match=r"lr must be a number, got '1e-4x'"):
        load_config(None, {"lr": "1e-4x"})


@pytest.mark.parametrize("text, match", [
    ("epoch: 3\n", r"c\.yaml: unknown config key\(s\): epoch \(did you mean epochs\?\)"),
    ("epochs: ten\n", r"c\.yaml: epochs must be an integer, got 'ten'"),
    ("epochs: 2.5\n", r"epochs must be an integer"),
    ("epochs: true\n", r"epochs must be an integer, got True \(bool\)"),  # a bool is an int to Python
    ("hflip: yes please\n", r"hflip must be a number"),
    ("cache: 1\n", r"cache must be true/false"),
    ("model: null\n", r"model may not be null"),
    ("crop_scale: [1]\n", r"crop_scale must be a list of two numbers"),
    ("- just\n- a list\n", r"must hold a mapping"),
    ("model: [unclosed\n", r"is not valid YAML"),
    ("mixed_precision: no\n", r"mixed_precision must be a string, got False .*put the value in quotes"),
])
def test_bad_yaml_names_the_key_and_file(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_malformed_yaml_is_one_line_naming_the_place(tmp_path):
    """PyYAML's own message spans lines (a copy of the text, a caret under it); ours is one."""
    f = tmp_path / "c.yaml"
    f.write_text("model: lenet\nepochs:\t2\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == (f"config file {f} is not valid YAML: line 2, column 8: "
                            "found character '\\t' that cannot start any token")
    with pytest.raises(ConfigError, match=r"^override 'epochs=\[1': value is not valid YAML \(line 1, column 3: .*\)$"):
        parse_override("epochs=[1")


def test_a_control_character_is_one_line_naming_the_place(tmp_path):
    """PyYAML's ReaderError has no line: "unacceptable character ...", then "in ..., position N" below it."""
    f = tmp_path / "c.yaml"
    f.write_text("model: lenet\nrun_name: a\x1b[0mb\n")  # a colour code pasted from a terminal
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == (f"config file {f} is not valid YAML: line 2, column 12: "
                            "unacceptable character #x001b: special characters are not allowed")
    with pytest.raises(ConfigError, match=r"^override 'model_args=\{a: \\x07\}': value is not valid YAML "
                                          r"\(line 1, column 5: unacceptable character #x0007: .*\)$"):
        parse_override("model_args={a: \x07}")


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes("run_name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"config file {f} is not UTF-8 text (byte 0xe9 at offset 13): save it as UTF-8"
    f.write_bytes("\ufeffrun_name: café\n".encode("utf-8"))  # a BOM, as Windows editors write
    assert load_config(f).run_name == "café"


@pytest.mark.parametrize("text", ["lr: 0.001\nepochs: 3\nlr: 0.01\n",
                                  "model_args: {first_pool: false, first_pool: true}\n",
                                  "model_args:\n  init_std: 0.01\n  init_std: 0.02\n"])
def test_a_key_set_twice_is_an_error(tmp_path, text):
    """PyYAML keeps the last of two equal keys, silently; which lr a run trains with is not a guess."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(f))} is not valid YAML: line \d+, column \d+: "
                                          r"(lr|first_pool|init_std) is set twice \(first on line \d\)$"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"first_pool is set twice"):
        parse_override("model_args={first_pool: false, first_pool: true}")


def test_a_yaml_merge_key_may_be_overridden(tmp_path):
    """`<<: *base` then a key of its own is YAML's way to override, not a key set twice."""
    f = tmp_path / "c.yaml"
    f.write_text("model_args:\n  <<: {first_pool: false, init_std: 0.01}\n  init_std: 0.02\n")
    assert load_config(f).model_args == {"first_pool": False, "init_std": 0.02}


@pytest.mark.parametrize("key, value, match", [
    ("interpolation", "bicubc", "interpolation must be one of nearest, bilinear, bicubic, lanczos, box, got 'bicubc'"),
    ("scheduler", "linear", "scheduler must be one of none, cosine, step"),
    ("mixed_precision", "fp8", "mixed_precision must be one of auto, no, fp16, bf16"),
    ("tracker", "mlflow", "tracker must be one of wandb, tensorboard, none"),
    ("holdout", 1.5, r"holdout must be a fraction of train in \[0, 1\), got 1.5"),
    ("holdout", 1.0, r"holdout must be a fraction of train in \[0, 1\), got 1.0"),  # nothing left to train on
    ("hflip", 2, "hflip must be between 0 and 1, got 2.0"),
    ("label_smoothing", -0.1, "label_smoothing must be between 0 and 1"),
    ("ema_decay", 1.0, "ema_decay must be between 0 and 1"),
    ("ema_decay", 0.0, "ema_decay must be between 0 and 1"),  # off is null, not 0
    ("downscale", 1.5, "downscale must be between 0 and 1"),
    ("downscale_range", [0, 1], r"downscale_range must be \[min, max\] with 0 < min <= max <= 1, got \(0.0, 1.0\)"),
    ("crop_scale", [1, 0.5], r"crop_scale must be \[min, max\]"),
    ("epochs", 0, "epochs must be at least 1, got 0"),
    ("batch_size", -8, "batch_size must be at least 1"),
    ("lr", -1e-3, r"lr must be above 0 \(e.g. 1e-4\), got -0.001"),
    ("lr", 0, r"lr must be above 0 \(e.g. 1e-4\), got 0.0"),  # a run that learns nothing
    ("optimizer", "adamm", r"optimizer must be a timm optimizer name \(did you mean adam"),
    ("tags", ["baseline", False], r"tags must be a list of tags \(put yes/no/on/off in quotes"),  # a bare `no`
])
def test_values_out_of_range_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=f"command line: {match}"):
        load_config(None, {key: value})


def test_a_saved_run_config_with_a_bare_boolean_tag_still_loads(tmp_path, caplog):
    # A run's config.yaml from before tags refused a bare no/yes; a user's own file is still refused.
    from rvf.config import load_run_config

    f = tmp_path / "config.yaml"
    f.write_text("model: alexnet\ntags:\n- false\n- baseline\n- true\n")
    assert load_run_config(f).tags == ["False", "baseline", "True"]  # the text W&B was sent
    assert f"{f}: tags [False, 'baseline', True] read as" in caplog.text and 'tags: ["no"]' in caplog.text
    with pytest.raises(ConfigError, match=r"tags must be a list of tags \(put yes/no/on/off in quotes"):
        load_config(f)
    f.write_text("tags: [[a]]\n")  # anything else wrong is as wrong as in any file
    with pytest.raises(ConfigError, match="tags must be a list of tags"):
        load_run_config(f)


def test_values_in_range_pass():
    cfg = load_config(None, {"interpolation": "lanczos", "holdout": 0.0, "hflip": 1, "optimizer": "AdamW",
                             "mixed_precision": None, "ema_decay": 0.999, "subset": None, "tags": ["v2", 2024]})
    assert (cfg.interpolation, cfg.holdout, cfg.hflip, cfg.optimizer) == ("lanczos", 0.0, 1.0, "AdamW")


def test_the_interpolation_choices_are_the_transforms():
    from rvf.config import _CHOICES
    from rvf.data.transforms import INTERPOLATIONS

    assert set(_CHOICES["interpolation"]) == set(INTERPOLATIONS)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="configs is a folder; give a YAML file"):
        load_config(ROOT / "configs")
    for key, value, message in (("seed", -1, r"seed must be in \[0, 2\*\*32\)"), ("lr", float("nan"), "finite"),
                                ("split_seed", 2**32, "split_seed must be in")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, {key: value})
    # timm's and Hugging Face's names for keys are suggested by name; far-fetched matches are not
    for key, hint in (("opt", "optimizer"), ("clip_grad", "grad_clip"), ("learning_rate", "lr"),
                      ("drop", "model_args")):
        with pytest.raises(ConfigError, match=f"{key} \\(did you mean {hint}"):
            load_config(None, {key: 1})
    with pytest.raises(ConfigError, match="command line: unknown config key"):
        load_config(None, dict([parse_override("bogus=1")]))
    for text in ("epochs", "=3", " =3"):
        with pytest.raises(ConfigError, match=f"override '{text}' must look like key=value"):
            parse_override(text)
    assert parse_override("crop-scale=[0.8, 1.0]") == ("crop_scale", [0.8, 1.0])
    assert parse_override("pretrained_file=") == ("pretrained_file", None)
    # string fields keep the text: YAML alone would turn `no` into false
    assert parse_override("mixed_precision=no") == ("mixed_precision", "no")
    assert parse_override("run-name=007") == ("run_name", "007")
    assert parse_override("mixed_precision=null") == ("mixed_precision", None)
    assert load_config(None, dict([parse_override("mixed_precision=no")])).mixed_precision == "no"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*_best.yaml")), ids=lambda p: p.stem)
def test_best_configs_load_and_name_their_model(path):
    cfg = load_config(path)
    assert cfg.model == path.stem.removesuffix("_best") and cfg.image_size == 64 and cfg.pretrained is False


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_loads_and_builds_its_model(path):
    from rvf.models import create_model

    cfg = load_config(path)  # strict: an unknown key or a wrong type fails here
    if not cfg.pretrained:  # pretrained configs would reach for the hub
        create_model(cfg.model, num_classes=2, **cfg.model_args)


def test_flagship_config_is_scratch_at_native_size():
    cfg = load_config(ROOT / "configs" / "flagship_resnet18.yaml")
    assert cfg.image_size == 256 and not cfg.pretrained and cfg.pretrained_file is None
    assert cfg.tta_hflip and cfg.translate == 0 and tuple(cfg.crop_scale) == (1.0, 1.0)


def test_grid512_flagship_is_the_flagship_with_conv1_stride_halved():
    # Its comparison with the flagship (same seeds, same session) holds only while the two
    # recipes differ in the stem alone.
    from dataclasses import asdict

    plain, grid = (asdict(load_config(ROOT / "configs" / f"{n}.yaml"))
                   for n in ("flagship_alexnet_bn", "flagship_alexnet_bn_grid512"))
    assert grid.pop("model_args") == {"stem_stride": 2} and plain.pop("model_args") == {}
    assert grid == plain


def test_train_script_resolves_flags_over_yaml():
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "-c", str(ROOT / "configs/alexnet.yaml"),
                        "--epochs", "3", "--set", "hflip=0.5", "--lr", "0.01", "--print-config"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert (cfg["model"], cfg["epochs"], cfg["hflip"], cfg["lr"]) == ("alexnet", 3, 0.5, 0.01)
    assert cfg["output_dir"] == str(Path("runs") / "alexnet")  # named after the config


def test_a_run_is_named_after_its_config_unless_told(tmp_path):
    def out(*argv):
        r = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), *argv, "--print-config"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return yaml.safe_load(r.stdout)["output_dir"]

    flagship = str(ROOT / "configs/flagship_alexnet_bn.yaml")
    assert out("-c", flagship) == str(Path("runs") / "flagship_alexnet_bn")  # not runs/alexnet_bn
    assert out("-c", flagship, "--output-dir", str(tmp_path / "x")) == str(tmp_path / "x")
    assert out("-c", flagship, "--set", f"output_dir={tmp_path / 'y'}") == str(tmp_path / "y")
    assert out("--model", "lenet") is None  # no config: train() uses runs/<model>


def test_output_dir_expands_home_as_data_dir_does(tmp_path, monkeypatch):
    """A YAML file's `output_dir: ~/runs/x` reaches no shell: it once made a folder named `~` in the cwd."""
    monkeypatch.setenv("HOME", str(tmp_path))
    f = tmp_path / "c.yaml"
    f.write_text("output_dir: ~/runs/x\n")
    assert load_config(f).resolved_output_dir() == tmp_path / "runs" / "x"


def test_train_script_bad_config_is_one_clear_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("epochs: 2\nbatchsize: 8\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), "-c", str(f)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {f}: unknown config key(s): batchsize (did you mean batch_size?)"]


def test_imagenet_config_is_ready_to_fine_tune():
    """The pretrained config names a real timm model and ImageNet's input pipeline (the
    weights themselves need the hub, which this project's machines cannot reach)."""
    from rvf.data import resolve_data_config
    from rvf.models import create_model

    cfg = load_config(ROOT / "configs" / "efficientnet_b0_imagenet.yaml")
    assert cfg.pretrained and cfg.model == "timm:efficientnet_b0"
    model = create_model(cfg.model, pretrained=False, num_classes=2)
    data_cfg = resolve_data_config(model, image_size=cfg.image_size)
    assert data_cfg.image_size == 224 and data_cfg.mean == pytest.approx((0.485, 0.456, 0.406), abs=1e-3)


@pytest.mark.parametrize("setting, launcher, native, want", [
    ("auto", None, True, "bf16"),  # hardware bf16 and no launcher choice: bf16
    ("auto", None, False, "no"),  # emulated bf16 is slower than fp32
    ("auto", "no", True, "bf16"),  # accelerate launch always exports its default "no"
    ("auto", "fp16", True, "fp16"),  # an explicit launcher choice wins
    ("no", "fp16", True, "no"),  # and so does the config's own
    ("bf16", None, False, "bf16"),
    (None, "fp16", True, None),  # None: Accelerate reads the launcher's itself
])
def test_mixed_precision_auto(monkeypatch, setting, launcher, native, want):
    from rvf import utils

    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    monkeypatch.setattr(utils, "has_native_bf16", lambda device: native)
    assert utils.resolve_mixed_precision(setting, "cpu") == want


def test_native_bf16_detection_is_a_bool():
    import torch

    from rvf.utils import has_native_bf16

    assert has_native_bf16("cpu") in (True, False)
    assert has_native_bf16("meta") is False
    if not torch.cuda.is_available():
        assert has_native_bf16("cuda") is False


def test_recipe_differences_leave_out_paths_tracking_and_speed():
    base = TrainConfig(seed=0)
    elsewhere = base.replace(data_dir="/d", output_dir="/o", cache_dir="/c", tracker="none", cpu_threads=3,
                             mixed_precision=None, channels_last=False, cuda_graph=False, split_seed=0)
    assert recipe_differences(elsewhere, base) == {}  # split_seed 0 is what seed 0 draws with
    assert recipe_differences(base.replace(epochs=1, split_seed=1, hflip=0.5), base) == {
        "split_seed": (1, 0), "epochs": (1, 20), "hflip": (0.5, 0.0)}
    assert RECIPE_NEUTRAL_KEYS <= set(base.to_dict())  # a renamed key would silently count again


def test_a_dotted_override_changes_one_entry_of_model_args(tmp_path):
    # `model_args={aux_logits: true}` on configs/inception_v1.yaml silently dropped its init_std and drop_rate.
    from rvf.config import ConfigError, load_config, parse_override

    def load(*texts, path=ROOT / "configs" / "inception_v1.yaml"):
        return load_config(path, dict(parse_override(t) for t in texts))

    assert load("model_args.aux_logits=true").model_args == {"init_std": 0.01, "drop_rate": 0.2, "aux_logits": True}
    assert load("model_args.drop_rate=0.5").model_args == {"init_std": 0.01, "drop_rate": 0.5}
    assert load("model_args={a: 1}", "model_args.b=2").model_args == {"a": 1, "b": 2}  # whole first, then entries
    assert load("model_args={aux_logits: true}").model_args == {"aux_logits": True}  # whole: as before
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): model_arg \(did you mean model_args\?\)"):
        load("model_arg.drop_rate=0.5")
    for bad in ("lr.x=1", "model_args.=1", "model_args.a.b=1"):
        with pytest.raises(ConfigError, match=r"only a mapping's own entries can be set this way"):
            load(bad)
