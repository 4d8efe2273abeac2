"""Published results: the README's table is generated from results/, and publishing copies
only small report files."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rvf.leaderboard import README_END, README_START, ResultsError, collect_runs, read_run_metrics, readme_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "rvf10k"


def _published_rows():
    return collect_runs(sorted(p for p in RESULTS.iterdir() if p.is_dir()))


def test_readme_table_is_the_published_results():
    text = (ROOT / "README.md").read_text()
    block = text.split(README_START, 1)[1].split(README_END, 1)[0]
    assert block.strip() == readme_table(_published_rows()).strip(), \
        "README results table is stale: run python scripts/publish_results.py"


def test_published_leaderboard_is_the_published_results(tmp_path):
    from rvf.leaderboard import write_leaderboard

    # The README's table is checked above; leaderboard.md is written from the same files by the
    # same script, and a metrics.json changed by hand would leave it stale unseen.
    write_leaderboard(_published_rows(), tmp_path)
    assert (RESULTS / "leaderboard.md").read_text() == (tmp_path / "leaderboard.md").read_text(), \
        "results/rvf10k/leaderboard.md is stale: run python scripts/publish_results.py"


def test_every_published_run_is_a_committed_config():
    import yaml

    for row in _published_rows():
        committed = ROOT / "configs" / f"{row['run']}.yaml"
        assert committed.is_file(), row["run"]
        # The run was trained with what the config says today: every key the YAML sets has the
        # same value in the run's saved config (paths and other unset keys may differ).
        used = yaml.safe_load((RESULTS / row["run"] / "config.yaml").read_text())
        for key, value in yaml.safe_load(committed.read_text()).items():
            got = used.get(key)
            assert got == value or (isinstance(value, list) and list(got or []) == value), \
                f"{row['run']}: {key} is {value!r} in {committed.name} but the published run used {got!r}"


def test_publish_copies_reports_only_and_rewrites_the_table(tmp_path):
    run = tmp_path / "runs" / "lenet"
    shutil.copytree(RESULTS / "lenet", run)
    for junk in ("model.safetensors", "samples.png"):
        (run / junk).write_bytes(b"x")
    (run / "checkpoints" / "epoch_0").mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nold\n{README_END}\n\nafter\n")
    results = tmp_path / "results"
    cmd = [sys.executable, "scripts/publish_results.py", str(run), "--results", str(results), "--readme", str(readme)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    published = {p.name for p in (results / "lenet").iterdir()}
    assert "metrics.json" in published and "curves.png" in published
    assert not published & {"model.safetensors", "samples.png", "checkpoints"}
    assert (results / "leaderboard.md").is_file() and (results / "leaderboard.png").is_file()
    assert "Valid split (3,000 images)," in (results / "leaderboard.md").read_text()  # from the run's counts
    text = readme.read_text()
    assert "\nold\n" not in text and "`configs/lenet.yaml`" in text and text.endswith("\n\nafter\n")
    r = subprocess.run(cmd[:2] + cmd[3:], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "already up to date" in r.stdout
    # bad input: a run that never finished, a README without markers
    r = subprocess.run(cmd[:2] + [str(tmp_path), *cmd[3:]], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "no metrics.json" in r.stderr
    readme.write_text("# no markers\n")
    r = subprocess.run(cmd[:2] + cmd[3:], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "no results markers" in r.stderr


def test_publish_refuses_runs_the_table_would_mislabel(tmp_path):
    import json

    readme = tmp_path / "README.md"
    readme.write_text(f"{README_START}\n{README_END}\n")
    results = tmp_path / "results"
    odd = tmp_path / "runs" / "my_experiment"  # not named after a config
    shutil.copytree(RESULTS / "lenet", odd)
    mini = tmp_path / "mini" / "lenet"  # scored on part of the valid split
    shutil.copytree(RESULTS / "lenet", mini)
    m = json.loads((mini / "metrics.json").read_text())
    m["valid"]["n"] = 400
    (mini / "metrics.json").write_text(json.dumps(m))

    def publish(*extra):
        return subprocess.run([sys.executable, "scripts/publish_results.py", *extra, "--results", str(results),
                               "--readme", str(readme)], capture_output=True, text=True, cwd=ROOT, timeout=120)

    r = publish(str(odd), str(mini))
    assert r.returncode == 2 and "configs/my_experiment.yaml, which does not exist" in r.stderr
    assert "scored on 400 valid images" in r.stderr and not results.exists()  # nothing copied
    assert publish(str(mini), "--force").returncode == 0 and (results / "lenet" / "metrics.json").is_file()


def test_publish_refuses_a_run_trained_otherwise_than_its_config(tmp_path):
    import yaml

    readme = tmp_path / "README.md"
    readme.write_text(f"{README_START}\n{README_END}\n")
    results = tmp_path / "results"
    run = tmp_path / "runs" / "lenet"
    shutil.copytree(RESULTS / "lenet", run)
    used = yaml.safe_load((run / "config.yaml").read_text())
    # --set epochs=1 and hflip=0.5 (a key lenet.yaml leaves at its default) change the run; the
    # rest only where it ran, how it was tracked and how fast, and split_seed 42 is seed 42.
    used |= {"epochs": 1, "hflip": 0.5, "data_dir": "/elsewhere", "cache_dir": "/tmp/c", "tracker": "none",
             "cpu_threads": 3, "compile": True, "split_seed": used["seed"]}
    (run / "config.yaml").write_text(yaml.safe_dump(used))

    def publish(*extra):
        return subprocess.run([sys.executable, "scripts/publish_results.py", str(run), *extra, "--results",
                               str(results), "--readme", str(readme)], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)

    r = publish()
    assert r.returncode == 2 and not results.exists(), r.stderr  # nothing copied
    assert r.stderr == (f"error: {run}: trained with other settings than configs/lenet.yaml, which the table would "
                        f"name: epochs 1 (the config's: 20), hflip 0.5 (the config's: 0.0); retrain it as the config "
                        f"says, or pass --force\n")
    (run / "config.yaml").unlink()
    r = publish()
    assert r.returncode == 2 and "no config.yaml, so nothing says it was trained as lenet.yaml" in r.stderr
    assert publish("--force").returncode == 0 and (results / "lenet" / "metrics.json").is_file()


def test_published_ensembles_are_quoted_from_their_metrics():
    import json

    text = (ROOT / "README.md").read_text()
    ensembles = sorted((RESULTS / "ensembles").glob("*/metrics.json"))
    assert ensembles
    for f in ensembles:
        m = json.loads(f.read_text())
        assert len(m["members"]) >= 2 and m["valid"]["n"] == 3000
        assert f"{100 * m['valid']['accuracy']:.2f} %" in text, f.parent.name
        assert f"ROC AUC {m['valid']['roc_auc']:.4f}" in text.replace("**", "").replace("\n  ", " "), f.parent.name


def test_runs_the_tables_cannot_read_are_named_and_never_copied(tmp_path):
    import json

    readme = tmp_path / "README.md"
    readme.write_text(f"{README_START}\n{README_END}\n")
    results = tmp_path / "results"
    shutil.copytree(RESULTS / "lenet", results / "lenet")
    broken = tmp_path / "runs" / "lenet_best"
    shutil.copytree(RESULTS / "lenet_best", broken)
    (broken / "metrics.json").write_text("{not json")
    scored = tmp_path / "runs" / "alexnet"  # what evaluate.py writes: a score, not a training run
    scored.mkdir(parents=True)
    (scored / "metrics.json").write_text(json.dumps({"model": "alexnet", "split": "valid", "valid": {"n": 3000}}))

    def publish(*extra):
        return subprocess.run([sys.executable, "scripts/publish_results.py", *extra, "--results", str(results),
                               "--readme", str(readme)], capture_output=True, text=True, cwd=ROOT, timeout=120)

    for run, message in ((broken, "metrics.json: not readable JSON"),
                         (scored, "metrics.json: lacks best_epoch, epochs")):
        r = publish(str(run), "--force")  # --force skips the naming rules, never this check
        assert r.returncode == 2 and f"{run}/{message}" in r.stderr, r.stderr
        assert sorted(p.name for p in results.iterdir()) == ["lenet"]  # nothing copied
    shutil.copytree(broken, results / "lenet_best")  # put there by hand: the rebuild names it
    r = publish()
    assert r.returncode == 2 and "lenet_best/metrics.json: not readable JSON" in r.stderr


def test_a_metrics_file_with_a_null_accuracy_is_named(tmp_path):
    # Present but null (a hand-edited or half-written file): the zoo's leaderboard and
    # publish_results.py stopped on a TypeError traceback in the table instead of naming the file.
    import json

    shutil.copytree(RESULTS / "lenet", tmp_path / "zoo" / "lenet")
    bad = tmp_path / "zoo" / "lenet" / "metrics.json"
    m = json.loads(bad.read_text())
    m["valid"]["accuracy"], m["epochs"] = None, "20"
    bad.write_text(json.dumps(m))
    with pytest.raises(ResultsError, match=f"{re.escape(str(bad))}: not a number: valid.accuracy None, epochs '20'"):
        read_run_metrics(bad)
    r = subprocess.run([sys.executable, "scripts/train_zoo.py", "--leaderboard-only", "--output-root",
                        str(tmp_path / "zoo")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"left out of the leaderboard: {bad}: not a number" in r.stderr


def test_a_score_sklearn_leaves_undefined_is_a_dash_and_ties_rank_by_auc(tmp_path):
    import json

    for name, acc, auc in (("b", 0.8, 0.85), ("a", 0.8, 0.9), ("c", 0.7, None)):
        shutil.copytree(RESULTS / "lenet", tmp_path / name)
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        m["valid"].update(accuracy=acc, roc_auc=auc, average_precision=None if auc is None else 0.8, eer=None)
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    rows = collect_runs([tmp_path / n for n in ("c", "b", "a")])
    assert [r["run"] for r in rows] == ["a", "b", "c"]
    assert readme_table(rows).splitlines()[-1].split(" | ")[5:8] == ["-", "-", "-"]  # AUC, AP, EER


def test_leaderboard_columns_hold_what_their_headers_say(tmp_path):
    import json

    from rvf.leaderboard import write_leaderboard

    md = write_leaderboard(collect_runs([RESULTS / "lenet"]), tmp_path).read_text().splitlines()
    header, row = ([c.strip() for c in line.strip("|").split("|")] for line in (md[4], md[6]))
    assert header[6:10] == ["accuracy %", "seed %", "ROC AUC", "AP"]
    v = json.loads((RESULTS / "lenet" / "metrics.json").read_text())["valid"]
    # The accuracy at the argmax, not at the threshold (76.57 against 75.97 here); AUC, then AP.
    assert row[6:10] == [f"{100 * v['accuracy']:.2f}", "76.1", f"{v['roc_auc']:.4f}", f"{v['average_precision']:.4f}"]
    assert header[11] == "train time" and row[11].endswith(" min")  # 2.7 minutes
    run = json.loads((RESULTS / "lenet" / "metrics.json").read_text()) | {"train_seconds": 41.6}
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "metrics.json").write_text(json.dumps(run))
    md = write_leaderboard(collect_runs([tmp_path / "short"]), tmp_path).read_text().splitlines()
    assert md[6].split("|")[12].strip() == "42 s"  # not "0.7 min", and never "0.0 min"


def _publish(*args, results, readme):
    return subprocess.run([sys.executable, "scripts/publish_results.py", *map(str, args), "--results", str(results),
                           "--readme", str(readme)], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_republishing_a_run_replaces_its_folder_and_names_what_it_dropped(tmp_path):
    import json

    readme = tmp_path / "README.md"
    readme.write_text(f"{README_START}\n{README_END}\n")
    results = tmp_path / "results"
    first = tmp_path / "first" / "alexnet_bn"  # with the robustness.* that robustness.py --output-dir wrote
    shutil.copytree(RESULTS / "alexnet_bn", first)
    assert _publish(first, results=results, readme=readme).returncode == 0
    robustness = ["robustness.json", "robustness.md", "robustness.png"]
    assert all((results / "alexnet_bn" / f).is_file() for f in robustness)
    # The same training again (e.g. from a copy without robustness.*): its robustness is still its own.
    again = tmp_path / "again" / "alexnet_bn"
    shutil.copytree(first, again, ignore=shutil.ignore_patterns("robustness.*"))
    r = _publish(again, results=results, readme=readme)
    assert r.returncode == 0 and f"kept {', '.join(robustness)}: the same training" in r.stdout, r.stdout
    assert all((results / "alexnet_bn" / f).is_file() for f in robustness)
    # A new training under the same name: the first training's robustness no longer describes it.
    retrained = tmp_path / "retrained" / "alexnet_bn"
    shutil.copytree(again, retrained)
    m = json.loads((retrained / "metrics.json").read_text())
    m["valid"]["accuracy"], m["train_seconds"] = 0.8, 1234.5
    (retrained / "metrics.json").write_text(json.dumps(m))
    r = _publish(retrained, results=results, readme=readme)
    assert r.returncode == 0, r.stderr
    assert f"dropped the previous training's {', '.join(robustness)}: {retrained} has none" in r.stdout, r.stdout
    assert sorted(p.name for p in (results / "alexnet_bn").iterdir()) == sorted(p.name for p in retrained.iterdir())
    assert json.loads((results / "alexnet_bn" / "metrics.json").read_text()) == m
    assert sorted(p.name for p in results.iterdir()) == ["alexnet_bn", "leaderboard.md", "leaderboard.png"]
    # A file no run publishes (put there by hand) is never deleted unseen: the publish is refused.
    (results / "alexnet_bn" / "notes.md").write_text("by hand\n")
    r = _publish(first, "--force", results=results, readme=readme)
    assert r.returncode == 2 and r.stderr == (
        f"error: {results / 'alexnet_bn'}: holds notes.md, which no run publishes (put there by hand?) and "
        f"publishing {first} would delete; move them out of that folder first\n")
    assert json.loads((results / "alexnet_bn" / "metrics.json").read_text()) == m  # nothing copied


def test_a_publish_that_fails_midway_leaves_the_published_folder_whole(tmp_path, monkeypatch):
    import json

    from rvf import leaderboard

    run = tmp_path / "runs" / "lenet"
    shutil.copytree(RESULTS / "lenet", run)
    results = tmp_path / "results"
    leaderboard.publish_run(run, results)
    before = {p.name: p.read_bytes() for p in (results / "lenet").iterdir()}
    m = json.loads((run / "metrics.json").read_text()) | {"train_seconds": 1.0}  # a new training
    (run / "metrics.json").write_text(json.dumps(m))
    copy2, copied = shutil.copy2, []

    def copy_until_the_disk_fills(src, dst):
        if len(copied) == 2:
            raise OSError(28, "No space left on device")
        copied.append(src)
        return copy2(src, dst)

    monkeypatch.setattr(leaderboard.shutil, "copy2", copy_until_the_disk_fills)
    with pytest.raises(OSError, match="No space left"):
        leaderboard.publish_run(run, results)
    assert {p.name: p.read_bytes() for p in (results / "lenet").iterdir()} == before
    assert sorted(p.name for p in results.iterdir()) == ["lenet"]  # no half-built folder beside it


def test_publishing_takes_the_robustness_table_where_robustness_py_writes_it(tmp_path):
    # By default robustness.py writes RUN/robustness-valid/, which publishing never looked in.
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_START}\n{README_END}\n")
    run, results = tmp_path / "runs" / "flagship_alexnet_bn", tmp_path / "results"
    shutil.copytree(RESULTS / "flagship_alexnet_bn", run)
    (run / "robustness-valid").mkdir()
    for f in ("robustness.json", "robustness.md", "robustness.png"):
        (run / f).rename(run / "robustness-valid" / f)
    assert _publish(run, results=results, readme=readme).returncode == 0
    for f in ("robustness.json", "robustness.md", "robustness.png"):
        assert (results / run.name / f).read_bytes() == (RESULTS / run.name / f).read_bytes()
