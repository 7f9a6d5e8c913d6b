"""The runner: plan, skip what is done, re-run what changed and its downstream, never trust half-written output."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_cli


@pytest.fixture
def corpus(tmp_path):
    import pydoc_data.topics

    text = "\n\n".join(v for _, v in sorted(pydoc_data.topics.topics.items()))[:60_000]
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


@pytest.fixture
def recipe(write_recipe, corpus):
    def make(vocab=400, block=64):
        return write_recipe({"seed": 3, "stages": {
            "tokenizer": {"inputs": {"corpus": str(corpus)}, "vocab_size": vocab},
            "prepare": {"inputs": {"corpus": str(corpus), "tokenizer": "tokenizer.tokenizer"}, "block_size": block},
        }})
    return make


def plan_status(path, *extra) -> dict[str, str]:
    out = run_cli("pipeline", "plan", str(path), *extra)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("  ") and not line.strip().startswith(("$", "fingerprint"))]
    return {parts[0]: parts[1] for parts in lines}


def manifest(tmp_path, stage):
    return json.loads((tmp_path / "run" / stage / "manifest.json").read_text())


def test_plan_lists_stages_and_commands_and_runs_nothing(recipe, tmp_path):
    path = recipe()
    out = run_cli("pipeline", "plan", str(path))
    assert out.returncode == 0, out.stderr
    assert f"$ python -m stages.tokenizer {path}" in out.stdout
    assert f"$ python -m stages.prepare {path}" in out.stdout
    assert plan_status(path) == {"tokenizer": "run", "prepare": "run"}
    assert not (tmp_path / "run").exists()


def test_run_skip_and_rerun_downstream_only(recipe, tmp_path):
    path = recipe()
    out = run_cli("pipeline", "run", str(path))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".work", "prepare", "report.md", "tokenizer"]
    assert sorted(p.name for p in (tmp_path / "run" / "prepare").iterdir()) == ["dataset", "manifest.json"]
    first = {s: manifest(tmp_path, s) for s in ("tokenizer", "prepare")}
    assert first["prepare"]["inputs"]["tokenizer"]["fingerprint"].startswith(first["tokenizer"]["fingerprint"])
    assert plan_status(path) == {"tokenizer": "done", "prepare": "done"}

    start = time.time()
    out = run_cli("pipeline", "run", str(path))
    assert out.returncode == 0 and time.time() - start < 15
    assert "tokenizer: up to date" in out.stdout and "prepare: up to date" in out.stdout
    assert {s: manifest(tmp_path, s)["finished"] for s in first} == {s: m["finished"] for s, m in first.items()}

    # a downstream setting re-runs only that stage
    path = recipe(block=32)
    assert plan_status(path) == {"tokenizer": "done", "prepare": "run"}
    assert run_cli("pipeline", "run", str(path)).returncode == 0
    assert manifest(tmp_path, "tokenizer")["finished"] == first["tokenizer"]["finished"]
    assert manifest(tmp_path, "prepare")["settings"]["block_size"] == 32

    # an upstream setting re-runs it and everything downstream
    path = recipe(vocab=420, block=32)
    out = run_cli("pipeline", "plan", str(path))
    assert "prepare      run   upstream tokenizer re-runs" in out.stdout
    assert run_cli("pipeline", "run", str(path)).returncode == 0
    assert manifest(tmp_path, "tokenizer")["metrics"]["vocab_size"] == 420
    assert manifest(tmp_path, "prepare")["fingerprint"] != first["prepare"]["fingerprint"]


def test_half_written_outputs_are_never_done(recipe, tmp_path):
    path = recipe()
    assert run_cli("pipeline", "run", str(path)).returncode == 0
    target = tmp_path / "run" / "tokenizer" / "manifest.json"
    good = target.read_text()
    for broken in (good[: len(good) // 2], good.replace('"complete": true', '"complete": false'), None):
        if broken is None:
            target.unlink()
        else:
            target.write_text(broken)
        assert plan_status(path)["tokenizer"] == "run"
    out = run_cli("pipeline", "run", str(path))
    assert out.returncode == 0, out.stderr
    assert manifest(tmp_path, "tokenizer")["complete"] is True


@pytest.mark.parametrize("delay", [1.0, 3.0])
def test_killed_stage_leaves_nothing_marked_done(recipe, tmp_path, delay):
    """SIGKILL at several moments: afterwards the stage is either complete or not done at all."""
    path = recipe()
    proc = subprocess.Popen([sys.executable, "-m", "stages.tokenizer", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out_dir = tmp_path / "run" / "tokenizer"
    if (out_dir / "manifest.json").exists():  # finished before the kill: then everything is there
        assert json.loads((out_dir / "manifest.json").read_text())["complete"] is True
        assert (out_dir / "tokenizer" / "tokenizer.json").is_file()
    else:
        assert plan_status(path)["tokenizer"] == "run"
    out = run_cli("pipeline", "run", str(path))
    assert out.returncode == 0, out.stderr
    assert plan_status(path) == {"tokenizer": "done", "prepare": "done"}


def test_only_and_force(recipe, tmp_path):
    path = recipe()
    out = run_cli("pipeline", "run", str(path), "--only", "prepare")
    assert out.returncode == 2 and "needs tokenizer" in out.stderr
    assert run_cli("pipeline", "run", str(path), "--only", "tokenizer").returncode == 0
    assert plan_status(path) == {"tokenizer": "done", "prepare": "run"}
    before = manifest(tmp_path, "tokenizer")["finished"]
    assert plan_status(path, "--force", "tokenizer")["tokenizer"] == "run"
    assert run_cli("pipeline", "run", str(path), "--force", "tokenizer", "--only", "tokenizer").returncode == 0
    assert manifest(tmp_path, "tokenizer")["finished"] != before
    out = run_cli("pipeline", "run", str(path), "--only", "pretrain")
    assert out.returncode == 2 and "--only pretrain: no such stage" in out.stderr


def test_stage_alone_needs_its_upstream(recipe, tmp_path):
    path = recipe()
    out = run_cli("stages.prepare", str(path))
    assert out.returncode == 2
    assert "stages.prepare.inputs.tokenizer: stage 'tokenizer' has not produced tokenizer yet" in out.stderr
    assert not (tmp_path / "run" / "prepare").exists()


def test_missing_dataset_column_names_column_and_dataset(write_recipe, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"document {i} " * 20}) for i in range(40)))
    path = write_recipe({"stages": {"tokenizer": {"inputs": {"corpus": str(data)}}}})
    out = run_cli("pipeline", "run", str(path))
    assert out.returncode != 0
    assert "missing column(s) text" in out.stderr and "rows.jsonl" in out.stderr
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_saved_dataset_input_keeps_its_fingerprint_when_datasets_caches_beside_it(write_recipe, tmp_path):
    """Mapping a saved dataset writes cache-*.arrow files into its folder; they are not new data."""
    import datasets

    from pipeline.runner.artifacts import path_fingerprint

    folder = tmp_path / "corpus"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b c"] * 50}),
                          "validation": datasets.Dataset.from_dict({"text": ["d e"] * 5})}).save_to_disk(str(folder))
    before = path_fingerprint(folder)
    datasets.load_from_disk(str(folder))["train"].map(lambda r: {"n": len(r["text"])})
    assert any(p.name.startswith("cache-") for p in folder.rglob("*.arrow"))
    assert path_fingerprint(folder) == before
    (folder / "train" / "extra.txt").write_text("new data")
    assert path_fingerprint(folder) != before


def test_an_input_rewritten_while_the_run_goes_on_fails_it_naming_the_input(recipe, corpus, tmp_path):
    """The plan fingerprints the corpus; if it changes before a stage reads it, that stage's outputs
    describe other data than planned: the run stops naming the input, and a re-run completes."""
    path = recipe()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "$ python -m stages.tokenizer" in line:
            with open(corpus, "a") as f:
                f.write("\n\nanother paragraph appended by someone else")
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert f"input corpus ({corpus}) changed while the pipeline ran" in err
    again = run_cli("pipeline", "run", str(path))
    assert again.returncode == 0, again.stderr
    assert plan_status(path) == {"tokenizer": "done", "prepare": "done"}


def test_forked_stages_match_fresh_processes(recipe, tmp_path):
    """Stages forked from a runner that already imported the libraries produce what fresh processes do."""
    import datasets

    path = recipe()
    forked = run_cli("pipeline", "run", str(path), f"run_dir={tmp_path / 'forked'}")
    fresh = run_cli("pipeline", "run", str(path), f"run_dir={tmp_path / 'fresh'}", env={"PIPELINE_FORK_STAGES": "0"})
    assert forked.returncode == 0 and fresh.returncode == 0, forked.stderr + fresh.stderr
    assert forked.stdout.count("forked from the runner, pid") == 2 and "forked from" not in fresh.stdout
    for stage in ("tokenizer", "prepare"):
        a, b = (json.loads((tmp_path / run / stage / "manifest.json").read_text()) for run in ("forked", "fresh"))
        untimed = [{k: v for k, v in m["metrics"].items() if "second" not in k} for m in (a, b)]
        assert a["fingerprint"] == b["fingerprint"] and untimed[0] == untimed[1], stage
    tok = "tokenizer/tokenizer/tokenizer.json"
    assert (tmp_path / "forked" / tok).read_bytes() == (tmp_path / "fresh" / tok).read_bytes()
    a, b = (datasets.load_from_disk(str(tmp_path / run / "prepare" / "dataset")) for run in ("forked", "fresh"))
    for split in ("train", "validation"):
        assert a[split].to_dict() == b[split].to_dict(), split


def test_killed_forked_stage_fails_the_run_and_is_not_done(recipe, tmp_path):
    path = recipe()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "tokenizer: forked from the runner, pid" in line:
            os.kill(int(line.split("pid")[1]), signal.SIGKILL)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "stage tokenizer failed (exit code -9)" in err, err[-2000:]
    assert plan_status(path) == {"tokenizer": "run", "prepare": "run"}
