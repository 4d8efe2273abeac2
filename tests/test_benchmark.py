"""The benchmark scripts run end to end on tiny inputs (smoke tests, not timings)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("device_data", ["off", "on"])
def test_benchmark_smoke(tmp_path, device_data):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "scripts/benchmark.py", "--synthetic", "48", "--image-size", "32",
                        "--batch-size", "16", "--repeats", "1", "--scaling", "1", "--device-data", device_data,
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"RVF_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                            "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(tmp_path.glob("rvf-bench-*"))  # its decode cache and data went with it
    res = json.loads((out / "lenet-32px-cpu.json").read_text())
    assert res["rvf_device_data"] is (device_data == "on") and res["rvf_fused_optimizer"] is True
    for key in ("baseline_train", "rvf_train", "baseline_data_only", "rvf_data_only"):
        assert res[key]["images"] == 48 and res[key]["images_per_second"] > 0, key
    assert res["speedup_epoch"] > 0 and res["cache_build_seconds"] >= 0 and res["rvf_peak_rss_mb"] > 0
    assert len(res["scaling"]["points"]) == 3 and "ms/img" in res["scaling"]["fit"]
    md = (out / "lenet-32px-cpu.md").read_text()
    assert "speed-up per epoch" in md and "20 epochs incl. the one-time cache build" in md  # the README's column


def test_benchmark_max_steps_scales_to_the_epoch(tmp_path):
    # ResNet50's CPU row is timed over 12 steps: its epoch and 20-epoch figures must be the whole split's.
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "scripts/benchmark.py", "--synthetic", "48", "--image-size", "32",
                        "--batch-size", "8", "--repeats", "1", "--max-steps", "2", "--scaling", "0",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"RVF_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                            "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "lenet-32px-cpu.json").read_text())
    for key in ("baseline_train", "rvf_train", "baseline_data_only", "rvf_data_only"):
        t = res[key]  # the first step of each epoch is not timed: 8 of its 16 images are
        assert t["images"] == 8 and t["epoch_seconds"] == pytest.approx(6 * t["timed_seconds"], rel=1e-3, abs=2e-4)
    assert res["projected_20_epochs_seconds"]["baseline"] == pytest.approx(
        20 * res["baseline_train"]["epoch_seconds"], abs=0.1)
    assert "8 images timed per epoch" in (out / "lenet-32px-cpu.md").read_text()
    for bad in (["--max-steps", "1"], ["--max-steps", "2", "--scaling", "1"]):
        r = subprocess.run([sys.executable, "scripts/benchmark.py", "--synthetic", "48", *bad], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 2 and "each epoch's first step is not timed" in r.stderr


def test_probe_training_traces_each_lr(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from synth import make_folder_dataset

    data = make_folder_dataset(tmp_path / "d", n=8, size=32)
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "scripts/probe_training.py", "--data-dir", str(data), "--model", "vgg16",
                        "--image-size", "32", "--batch-size", "8", "--steps", "4", "--every", "2",
                        "--lrs", "1e-3", "1e-5", "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={"RVF_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                                      "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    traces = json.loads(out.read_text())["traces"]
    assert set(traces) == {"0.001", "1e-05"}
    for rows in traces.values():
        assert [row["step"] for row in rows] == [1, 2, 4]
        assert all(0 <= row["dead_last_conv"] <= 1 and 0 <= row["dead_head"] <= 1 and row["loss"] > 0 for row in rows)


def test_precision_benchmark_smoke(tmp_path):
    out = tmp_path / "precision.json"
    r = subprocess.run([sys.executable, "benchmarks/precision.py", "--models", "lenet", "alexnet_bn",
                        "--image-size", "32", "--batch-size", "4", "--steps", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["native_bf16"] in (True, False) and [m["model"] for m in res["models"]] == ["lenet", "alexnet_bn"]
    for row in res["models"]:
        assert row["fp32_ms"] > 0 and row["bf16_ms"] > 0 and row["speedup"] > 0
    assert "native bf16" in r.stdout


def test_step_ops_counts_each_training_step(tmp_path):
    out = tmp_path / "ops.json"
    r = subprocess.run([sys.executable, "benchmarks/step_ops.py", "--configs", "configs/lenet.yaml",
                        "configs/alexnet_bn.yaml", "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ops = json.loads(out.read_text())
    # A forward, a backward and an optimizer step: dozens of ops at least; BatchNorm adds some.
    assert 50 < ops["lenet"] < ops["alexnet_bn"] < 1000 and "ATen ops per training step" in r.stdout


def test_benchmark_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "scripts/benchmark.py", "--data-dir", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("rvf-bench-*"))
    for argv, message in ((["--data-dir", str(tmp_path), "--synthetic", "10"], "pass one"),
                          (["--data-dir", str(tmp_path), "--synthetic-dir", str(tmp_path / "s")], "--synthetic N too")):
        r = subprocess.run([sys.executable, "scripts/benchmark.py", *argv], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_benchmark_names_an_out_folder_it_cannot_create_before_timing(tmp_path):
    (tmp_path / "a_file").write_text("")
    r = subprocess.run([sys.executable, "scripts/benchmark.py", "--synthetic", "16", "--image-size", "32",
                        "--repeats", "1", "--scaling", "0", "--out", str(tmp_path / "a_file" / "bench")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("error: cannot write there: ") and str(tmp_path / "a_file") in r.stderr
    assert "cache build" not in r.stdout  # nothing was timed first


def test_zoo_checks_every_config_before_training_any(tmp_path):
    good = ROOT / "configs" / "lenet.yaml"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "lenet.yaml").write_text("model: lenet\n")
    (tmp_path / "bad.yaml").write_text("model: lenet\nepochs: 0\n")
    r = subprocess.run([sys.executable, "scripts/train_zoo.py", "--configs", str(good),
                        str(tmp_path / "a" / "lenet.yaml"), str(tmp_path / "bad.yaml"), str(tmp_path / "missing.yaml"),
                        "--output-root", str(tmp_path / "zoo")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and not (tmp_path / "zoo").exists()  # nothing trained
    assert "epochs must be at least 1" in r.stderr and "missing.yaml does not exist" in r.stderr
    assert "two configs are named lenet.yaml" in r.stderr
    r = subprocess.run([sys.executable, "scripts/train_zoo.py"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--configs" in r.stderr and "--leaderboard-only" in r.stderr


def test_zoo_builds_every_model_before_training_any(tmp_path):
    # A typo in the last config's model name (or a crop its model cannot take) failed only once the
    # runs before it had trained: load_config does not build the model, train.py did, at its start.
    (tmp_path / "typo.yaml").write_text("model: lenett\n")
    (tmp_path / "crop.yaml").write_text("model: lenet\nimage_size: 32\ncrop_size: 48\n")
    (tmp_path / "args.yaml").write_text("model: lenet\nmodel_args: {drop_rat: 0.1}\n")
    r = subprocess.run([sys.executable, "scripts/train_zoo.py", "--configs", str(ROOT / "configs" / "lenet.yaml"),
                        *(str(tmp_path / f"{n}.yaml") for n in ("typo", "crop", "args")),
                        "--output-root", str(tmp_path / "zoo")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and not (tmp_path / "zoo").exists(), r.stderr[-2000:]  # nothing trained
    lines = r.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"error: {tmp_path}") for line in lines), lines
    assert "Unknown model 'lenett'" in lines[0] and "crop_size 48" in lines[1] and "drop_rat" in lines[2]


def test_zoo_loads_every_configs_teachers_before_training_any(tmp_path):
    # A teacher folder with a typo (or at another size) failed only when its config's turn came.
    (tmp_path / "student.yaml").write_text(f"model: lenet\nteachers: [{tmp_path / 'no_such_run'}]\n")
    r = subprocess.run([sys.executable, "scripts/train_zoo.py", "--configs", str(ROOT / "configs" / "lenet.yaml"),
                        str(tmp_path / "student.yaml"), "--output-root", str(tmp_path / "zoo")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and not (tmp_path / "zoo").exists(), r.stderr[-2000:]  # nothing trained
    assert r.stderr == (f"error: {tmp_path / 'student.yaml'}: teacher {tmp_path / 'no_such_run'} (the teachers key): "
                        f"checkpoint folder {tmp_path / 'no_such_run'} does not exist\n")


def test_zoo_fetches_pretrained_weights_before_training_any(tmp_path):
    # Offline (HF_HUB_OFFLINE: no network call at all, on any machine), a pretrained config late
    # in the zoo fails at once instead of after the configs before it have trained.
    (tmp_path / "imagenet.yaml").write_text("model: timm:resnet18\npretrained: true\n")
    r = subprocess.run([sys.executable, "scripts/train_zoo.py", "--configs", str(ROOT / "configs" / "lenet.yaml"),
                        str(tmp_path / "imagenet.yaml"), "--output-root", str(tmp_path / "zoo")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and not (tmp_path / "zoo").exists()
    assert f"{tmp_path / 'imagenet.yaml'}: Could not get pretrained weights for 'timm:resnet18'" in r.stderr
    assert "pretrained_file=" in r.stderr
    # A finished run that --skip-done keeps needs no weights; a folder that is not a training run
    # (an ensemble's) is left out of the leaderboard, by name, rather than failing it.
    shutil.copytree(ROOT / "results" / "rvf10k" / "lenet", tmp_path / "zoo" / "imagenet")
    (tmp_path / "zoo" / "ens").mkdir()
    (tmp_path / "zoo" / "ens" / "metrics.json").write_text('{"members": [], "valid": {}}')
    r = subprocess.run([sys.executable, "scripts/train_zoo.py", "--configs", str(tmp_path / "imagenet.yaml"),
                        "--skip-done", "--output-root", str(tmp_path / "zoo")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0 and "imagenet: done already, skipping" in r.stdout, r.stderr[-2000:]
    assert "left out of the leaderboard" in r.stderr and "ens/metrics.json: lacks" in r.stderr
    assert "| imagenet |" in (tmp_path / "zoo" / "leaderboard.md").read_text()


def test_zoo_refuses_finished_runs_unless_told(tmp_path):
    from synth import make_folder_dataset

    data = make_folder_dataset(tmp_path / "d", n=4, size=32)
    zoo = tmp_path / "zoo"
    for name in ("lenet", "lenet_best"):
        (zoo / name).mkdir(parents=True)
        (zoo / name / "config.yaml").write_text("model: lenet\n")  # a run trained before...
    (zoo / "lenet" / "metrics.json").write_text("{}")  # ...to the end; lenet_best stopped early
    base = [sys.executable, "scripts/train_zoo.py", "--configs", str(ROOT / "configs" / "lenet.yaml"),
            str(ROOT / "configs" / "lenet_best.yaml"), "--output-root", str(zoo)]
    finished = f"error: these run folders hold finished runs: {zoo / 'lenet'}; pass --skip-done to keep them, or " \
               "--overwrite to train them again\n"
    unfinished = (f"error: these run folders hold runs that did not finish (no metrics.json; stopped, or still "
                  f"training): {zoo / 'lenet_best'}; pass --overwrite to train them again (or first finish one that "
                  f"saved an epoch with scripts/train.py --resume RUN_DIR)\n")
    r = subprocess.run(base + ["--data-dir", str(data)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stderr == finished + unfinished, r.stderr[-2000:]
    # --skip-done keeps the finished one and is never asked for again; the unfinished one still needs --overwrite.
    r = subprocess.run(base + ["--data-dir", str(data), "--skip-done"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 2 and r.stderr == unfinished, r.stderr[-2000:]
    assert all((zoo / name / "config.yaml").read_text() == "model: lenet\n" for name in ("lenet", "lenet_best"))
    for extra, message in ((["--data-dir", str(tmp_path / "nope"), "--overwrite"], "does not exist"),
                           (["--data-dir", str(data), "--overwrite", "--launcher", "nosuchcmd --x"],
                            "no command 'nosuchcmd' on PATH"),
                           (["--data-dir", str(data), "--overwrite", "--launcher", "accelerate 'launch"],
                            "No closing quotation")):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_peak_sampler_sees_a_child_process_memory():
    import subprocess as sp

    from rvf.utils import PeakSampler, tree_rss

    alone = tree_rss()
    # A child holding ~200 MB: the tree's resident memory must count it, as a benchmark's workers.
    child = sp.Popen([sys.executable, "-c", "import time; b = b'x' * (200 * 2**20); time.sleep(3)"])
    try:
        with PeakSampler(tree_rss, interval=0.02) as mem:
            time.sleep(1.5)
        assert mem.peak > alone + 150 * 2**20
    finally:
        child.kill()
        child.wait()
    assert tree_rss(child.pid) == 0  # a process that is gone counts nothing


def test_api_latency_writes_its_table_with_the_command(tmp_path):
    out = tmp_path / "latency.md"
    r = subprocess.run([sys.executable, "benchmarks/api_latency.py", "--models", "lenet", "--n", "3", "--warmup", "1",
                        "--output", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("`python benchmarks/api_latency.py --models lenet --n 3")
    assert "| model | input | p50 ms |" in text and "| lenet | 64 px |" in text


@pytest.mark.parametrize("argv, says", [
    (["benchmarks/precision.py", "--models", "lenet", "nope"], "--models nope: Unknown model 'nope'"),
    (["benchmarks/precision.py", "--steps", "0"], "argument --steps: must be at least 1"),
    (["benchmarks/step_ops.py", "--configs", "configs/nope.yaml"], "configs/nope.yaml does not exist"),
    (["benchmarks/upload_cost.py", "--checkpoint", "no/such/run"], "no/such/run: no model.json"),
], ids=["precision-model", "precision-steps", "step_ops-config", "upload_cost-checkpoint"])
def test_benchmark_tools_name_bad_input_in_one_line(argv, says):
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_ab_times_two_checkouts_and_compares_their_outputs(tmp_path):
    # Two tiny "checkouts": the same script, writing the same or a different file into @OUT.
    for name, text in (("old", "same"), ("new", "same"), ("changed", "other")):
        tree = tmp_path / name
        tree.mkdir()
        (tree / "s.py").write_text(f"import pathlib, sys\nout = pathlib.Path(sys.argv[1]); out.mkdir()\n"
                                   f"(out / 'r.txt').write_text({text!r})\n")
        subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "s", "--allow-empty"],
                       cwd=tree, check=True)
    env = {**os.environ, "PYTHON": sys.executable}

    def ab(new, rounds="2"):
        return subprocess.run(["bash", str(ROOT / "benchmarks/ab.sh"), str(tmp_path / "old"), str(tmp_path / new),
                               rounds, "s.py", "@OUT"], capture_output=True, text=True, timeout=120, env=env)

    r = ab("new")
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("round")] == \
        ["round 1, old", "round 1, new", "round 2, old", "round 2, new"]
    assert "# old: " in r.stdout and "+ changes" in r.stdout  # s.py is not committed
    assert r.stdout.rstrip().endswith("outputs: identical")
    assert "outputs: DIFFERENT" in ab("changed").stdout
    r = ab("new", rounds="0")
    assert r.returncode == 2 and "ROUNDS must be a whole number" in r.stderr
