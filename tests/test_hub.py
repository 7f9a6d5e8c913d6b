"""Pushing artifacts to a hub, against the in-memory Hub API server in tests/hub_server.py.

A fake run folder (tokenizer -> prepare -> pretrain -> sft, published with `artifacts.publish` like the real
stages do) holds a tiny real Llama checkpoint, a trained byte-level BPE tokenizer and a two-split dataset.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runner import artifacts
from tests.conftest import ROOT, run_cli
from tests.hub_server import HubServer

TOKEN = "hf_pushTestTOKEN_9f3c2a7e51d04b8a"  # distinctive, so a leak is found by grepping
USER = "alice"


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """No token from the environment or a login, plain LFS, caches inside tmp_path."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_ENABLE_HF_TRANSFER", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))  # no stored login leaks in
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)  # constants are read at import, maybe by another test
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))


@pytest.fixture
def hub():
    server = HubServer(tokens={TOKEN: USER, "hf_otherUserToken": "bob"}).start()
    yield server
    server.stop()


def sub_env(tmp_path, **extra) -> dict:
    return {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HOME": str(tmp_path / "hf_sub"),
            "HF_TOKEN": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


_CACHE: dict = {}


def _tokenizer():
    if "tok" not in _CACHE:
        from stages.tokenizer import train_tokenizer

        texts = ["the quick brown fox jumps over the lazy dog", "hello world, hello hub"] * 20
        _CACHE["tok"] = train_tokenizer(texts, 300, 1)
    return _CACHE["tok"]


def _model(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def _publish(run: Path, stage: str, outputs: dict, inputs: dict, metrics: dict | None = None,
             settings: dict | None = None) -> str:
    """Write outputs via callables into staging and publish them with a manifest, like stage_main does."""
    staging = run / ".work" / stage / "staging"
    for name, write in outputs.items():
        (staging / name).mkdir(parents=True, exist_ok=True)
        write(staging / name)
    fp = artifacts.fingerprint({"stage": stage, "inputs": inputs, "settings": settings})
    manifest = {"stage": stage, "fingerprint": fp, "inputs": inputs, "outputs": sorted(outputs),
                "settings": {"inputs": {k: v["spec"] for k, v in inputs.items()}, **(settings or {})},
                "model": None, "seed": 1234, "metrics": metrics or {}, "started": "2026-11-23T10:00:00+00:00",
                "finished": "2026-11-23T10:01:00+00:00", "duration_s": 60.0, "versions": {"torch": "2.13.0"},
                "python": "3.11.7", "git_commit": "0" * 40}
    artifacts.publish(staging, run / stage, manifest)
    return fp


def _stage_input(run: Path, stage: str, output: str, fp: str) -> dict:
    return {"spec": f"{stage}.{output}", "kind": "stage", "fingerprint": f"{fp}:{output}",
            "path": str(run / stage / output)}


@pytest.fixture
def run(tmp_path) -> Path:
    """tokenizer -> prepare (dataset) -> pretrain (model) -> sft (model, from pretrain.model + a hub dataset)."""
    from datasets import Dataset, DatasetDict

    run = tmp_path / "run"
    tok = _tokenizer()
    builtin = {"corpus": {"spec": "builtin:stdlib", "kind": "builtin", "fingerprint": "c0ffee"}}
    fp_tok = _publish(run, "tokenizer", {"tokenizer": tok.save_pretrained}, builtin, settings={"vocab_size": 300})
    ids = [tok("hello world the quick brown fox")["input_ids"] * 3] * 8
    data = DatasetDict({"train": Dataset.from_dict({"input_ids": ids}),
                        "validation": Dataset.from_dict({"input_ids": ids[:2]})})
    fp_prep = _publish(run, "prepare", {"dataset": data.save_to_disk},
                       {**builtin, "tokenizer": _stage_input(run, "tokenizer", "tokenizer", fp_tok)},
                       settings={"block_size": 16})

    def checkpoint(seed):
        def write(path):
            _model(seed).save_pretrained(path)
            tok.save_pretrained(path)
        return write

    fp_pre = _publish(run, "pretrain", {"model": checkpoint(1)},
                      {"data": _stage_input(run, "prepare", "dataset", fp_prep),
                       "tokenizer": _stage_input(run, "tokenizer", "tokenizer", fp_tok)},
                      metrics={"val_loss": 5.25, "val_bpb": 2.125, "tokens": 4096, "distributed": "cpu x1"},
                      settings={"max_steps": 10, "lr": 0.001})
    _publish(run, "sft", {"model": checkpoint(2)},
             {"model": _stage_input(run, "pretrain", "model", fp_pre),
              "data": {"spec": "hub:org/chat-data", "kind": "hub", "fingerprint": "hub:org/chat-data"}},
             metrics={"val_loss": 4.5}, settings={"epochs": 1})
    return run


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _push(path, repo, hub, **kw) -> str:
    from pipeline.hub.push import push_artifact

    return push_artifact(path, repo, endpoint=hub.url, token=TOKEN, **kw)


# --- tests ---------------------------------------------------------------------------------------------------


LOAD_SCRIPT = """
import json, sys, torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
repo, rev, data_repo = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(repo, revision=rev).eval()
tok = AutoTokenizer.from_pretrained(repo, revision=rev)
ids = tok("hello world the quick brown fox", return_tensors="pt")["input_ids"]
data = load_dataset(data_repo)  # through the card's `configs`
with torch.no_grad():
    print(json.dumps({"ids": ids[0].tolist(), "logits": model(ids).logits[0].tolist(),
                      "validation": data["validation"][:]["input_ids"]}))
"""


def test_round_trip_model_and_dataset(hub, run, tmp_path):
    import torch
    from datasets import load_from_disk
    from huggingface_hub import snapshot_download

    assert _push(run / "prepare", "alice/tiny-data", hub) == "alice/tiny-data@main"  # stage folder: its output
    assert _push(run / "pretrain" / "model", "alice/tiny-lm", hub, revision="v1") == "alice/tiny-lm@v1"

    snaps = {}
    for repo, repo_type, rev, local in (("alice/tiny-data", "dataset", "main", run / "prepare" / "dataset"),
                                        ("alice/tiny-lm", "model", "v1", run / "pretrain" / "model")):
        snap = Path(snapshot_download(repo, repo_type=repo_type, revision=rev, endpoint=hub.url, token=TOKEN,
                                      cache_dir=tmp_path / "dl"))
        remote = {k: v for k, v in _local_files(snap).items() if k not in ("README.md", ".gitattributes")}
        assert remote == _local_files(local), repo  # same names, byte-identical
        assert (snap / "README.md").read_text().startswith("---\n")
        snaps[repo] = snap
    data = load_from_disk(str(snaps["alice/tiny-data"]))
    assert data["train"][:]["input_ids"] == load_from_disk(str(run / "prepare" / "dataset"))["train"][:]["input_ids"]
    assert {p for p, _ in hub.files("alice/tiny-lm", revision="v1").items()} >= {"model.safetensors", "config.json"}

    # a fresh process loads both through the hub as a user would: same logits, same rows
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, "alice/tiny-lm", "v1", "alice/tiny-data"],
                         capture_output=True, text=True,
                         timeout=120, env={**os.environ, **sub_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN)})
    assert out.returncode == 0, out.stderr[-3000:]
    remote = json.loads(out.stdout.strip().splitlines()[-1])
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(run / "pretrain" / "model").eval()
    with torch.no_grad():
        expected = local(torch.tensor([remote["ids"]])).logits[0]
    torch.testing.assert_close(torch.tensor(remote["logits"]), expected, rtol=1e-5, atol=1e-6)  # thread counts differ
    assert remote["validation"] == load_from_disk(str(run / "prepare" / "dataset"))["validation"][:]["input_ids"]


def test_card_names_parent_datasets_and_metrics(hub, run, tmp_path):
    from huggingface_hub import ModelCard, hf_hub_download

    _push(run / "prepare" / "dataset", "alice/tiny-data", hub)
    _push(run / "pretrain" / "model", "alice/tiny-lm", hub)
    _push(run / "sft" / "model", "alice/tiny-sft", hub, license="mit")

    def card(repo):
        return ModelCard.load(hf_hub_download(repo, "README.md", endpoint=hub.url, token=TOKEN,
                                              cache_dir=tmp_path / "dl"))

    pre, sft = card("alice/tiny-lm"), card("alice/tiny-sft")
    assert pre.data.get("base_model") is None  # trained from scratch
    assert pre.data.datasets == ["alice/tiny-data"]
    assert sft.data.base_model == "alice/tiny-lm"  # the parent's pushed repo, from RUN_DIR/.pushes.json
    assert sft.data.datasets == ["org/chat-data"]  # a hub input by its hub name
    assert sft.data.license == "mit" and pre.data.license == "apache-2.0"
    assert sft.data.library_name == "transformers" and "llm-pipeline" in sft.data.tags and "sft" in sft.data.tags
    results = {r.metric_type: r.metric_value for r in pre.data.eval_results}  # parsed from model-index
    assert results == {"val_loss": 5.25, "val_bpb": 2.125}  # evaluation results; counts stay in the text
    assert "| tokens | 4096 |" in pre.text
    assert pre.data.eval_results[0].dataset_type == "alice/tiny-data"
    # the text: how to load, and the chain of stages with their fingerprints
    manifests = {s: artifacts.read_manifest(run / s) for s in ("tokenizer", "prepare", "pretrain", "sft")}
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-sft")' in sft.text
    for stage, m in manifests.items():
        assert f"| {stage} | `{m['fingerprint']}` |" in sft.text
    order = [sft.text.index(f"| {s} |") for s in ("tokenizer", "prepare", "pretrain", "sft")]
    assert order == sorted(order)
    assert "`alice/tiny-lm@main`" in sft.text and "max_steps=10" in sft.text
    # dataset card: configs for load_dataset, splits
    data_card = Path(hf_hub_download("alice/tiny-data", "README.md", repo_type="dataset", endpoint=hub.url,
                                     token=TOKEN, cache_dir=tmp_path / "dl")).read_text()
    from huggingface_hub import DatasetCard

    dc = DatasetCard(data_card)
    assert dc.data.configs[0]["data_files"] == [{"split": "train", "path": "train/*.arrow"},
                                                {"split": "validation", "path": "validation/*.arrow"}]
    assert "| train | 8 |" in data_card


def test_card_rules_without_a_server(run):
    """Hub inputs give base_model by name; ppo is tagged rlhf; a reward model loads with its auto class."""
    from pipeline.hub.model_card import auto_class_for
    from pipeline.hub.push import render_card, resolve_artifact

    artifact = resolve_artifact(run / "sft" / "model")
    artifact.manifest = {**artifact.manifest, "stage": "ppo", "inputs": {
        "policy": {"spec": "hub:org/base-lm@v2", "kind": "hub", "fingerprint": "hub:org/base-lm@v2"},
        "reward_model": {"spec": "hub:org/rm", "kind": "hub", "fingerprint": "hub:org/rm"}}}
    from huggingface_hub import ModelCard

    card = ModelCard(render_card(artifact, "alice/ppo", None, "apache-2.0", "http://x"))
    assert card.data.base_model == "org/base-lm" and "rlhf" in card.data.tags
    assert auto_class_for({"architectures": ["LlamaForSequenceClassification"]}) == "AutoModelForSequenceClassification"
    assert auto_class_for({"architectures": ["LlamaForCausalLM"]}) == "AutoModelForCausalLM"
    # no parent on this hub: no base_model, lineage in words
    plain = ModelCard(render_card(resolve_artifact(run / "sft" / "model"), "alice/sft", None, "apache-2.0", "http://x"))
    assert plain.data.get("base_model") is None and "not pushed to this hub" in plain.text


def test_tokenizer_push(hub, run):
    from huggingface_hub import ModelCard

    assert _push(run / "tokenizer", "alice/tok", hub) == "alice/tok@main"
    files = hub.files("alice/tok")
    assert {k: v for k, v in files.items() if k not in ("README.md", ".gitattributes")} == \
        _local_files(run / "tokenizer" / "tokenizer")
    card = ModelCard(files["README.md"].decode())
    assert 'AutoTokenizer.from_pretrained("alice/tok")' in card.text and "AutoModel" not in card.text
    assert card.data.get("model-index") is None and "tokenizer" in card.data.tags


def test_private_repo_needs_the_token(hub, run, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    _push(run / "pretrain" / "model", "alice/secret", hub, private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).model_info("alice/secret", token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "config.json", endpoint=hub.url, token=False, cache_dir=tmp_path / "a")
    with pytest.raises(RepositoryNotFoundError):  # another user's valid token
        HfApi(endpoint=hub.url).model_info("alice/secret", token="hf_otherUserToken")
    assert HfApi(endpoint=hub.url).model_info("alice/secret", token=TOKEN).private is True
    got = hf_hub_download("alice/secret", "config.json", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "b")
    assert Path(got).read_bytes() == (run / "pretrain" / "model" / "config.json").read_bytes()


def test_unchanged_push_uploads_nothing(hub, run):
    _push(run / "pretrain" / "model", "alice/tiny-lm", hub)
    first = dict(hub.counts)
    assert first["commit"] == 1 and first["lfs_put"] == 1  # model.safetensors
    _push(run / "pretrain" / "model", "alice/tiny-lm", hub)
    assert hub.counts["commit"] == 1 and hub.counts["lfs_put"] == 1
    # a changed card (another license) is one small commit; the weights are not sent again
    _push(run / "pretrain" / "model", "alice/tiny-lm", hub, license="mit")
    assert hub.counts["commit"] == 2 and hub.counts["lfs_put"] == 1
    pushes = json.loads((run / ".pushes.json").read_text())
    fp = artifacts.read_manifest(run / "pretrain")["fingerprint"]
    assert pushes[f"{fp}:model"]["repo"] == "alice/tiny-lm" and pushes[f"{fp}:model"]["endpoint"] == hub.url


def test_push_mirrors_the_artifact(hub, run):
    """Files the artifact no longer has are removed from the revision (no stale shards)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    _push(run / "pretrain" / "model", "alice/tiny-lm", hub)
    api.create_commit("alice/tiny-lm", [CommitOperationAdd("model-00002-of-00002.safetensors", b"stale")],
                      commit_message="stale shard")
    _push(run / "pretrain" / "model", "alice/tiny-lm", hub)
    files = hub.files("alice/tiny-lm")
    assert "model-00002-of-00002.safetensors" not in files
    assert set(files) == set(_local_files(run / "pretrain" / "model")) | {"README.md", ".gitattributes"}


def test_interrupted_push_completes_when_rerun(hub, run, tmp_path):
    """Kill a push after its first LFS upload; the re-run uploads only what is missing and commits once."""
    hub.hold_lfs_puts_after(1)  # two arrow files: the first goes through, the second hangs
    cmd = [sys.executable, "-m", "pipeline", "push", str(run / "prepare" / "dataset"), "--repo", "alice/tiny-data",
           "--endpoint", hub.url]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **sub_env(tmp_path, HF_TOKEN=TOKEN)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while not (hub.counts["lfs_put"] >= 1 and hub.counts["lfs_put_held"] >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "push never reached its second upload"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    hub.release()
    assert hub.counts["commit"] == 0  # killed halfway: nothing committed
    assert not any(p.endswith(".arrow") for p in hub.files("alice/tiny-data", "dataset"))

    _push(run / "prepare" / "dataset", "alice/tiny-data", hub)
    assert hub.counts["lfs_put"] == 2  # one before the kill, only the missing one after
    assert hub.counts["commit"] == 1
    files = {k: v for k, v in hub.files("alice/tiny-data", "dataset").items() if k not in ("README.md", ".gitattributes")}
    assert files == _local_files(run / "prepare" / "dataset")


def test_dropped_connection_is_retried(hub, run):
    hub.drop_lfs_put(1)  # the server hangs up on the first upload; the client retries it
    _push(run / "pretrain" / "model", "alice/tiny-lm", hub)
    assert hub.counts["lfs_put_started"] == 2 and hub.counts["lfs_put"] == 1 and hub.counts["commit"] == 1


def test_cli_errors_are_clear_and_never_show_the_token(hub, run, tmp_path):
    model = str(run / "pretrain" / "model")
    bad = "hf_wrongTOKEN_0123456789abcdef"
    out = run_cli("pipeline", "push", model, "--repo", "alice/x", "--endpoint", hub.url,
                  env=sub_env(tmp_path, HF_TOKEN=bad), timeout=120)
    assert out.returncode != 0
    assert f"the hub at {hub.url} rejected the token (401)" in out.stderr, out.stderr
    assert bad not in out.stdout + out.stderr and "Traceback" not in out.stderr

    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = run_cli("pipeline", "push", model, "--repo", "alice/x", "--endpoint", dead,
                  env=sub_env(tmp_path, HF_TOKEN=TOKEN), timeout=120)
    assert out.returncode != 0 and f"cannot reach the hub at {dead}" in out.stderr, out.stderr
    assert TOKEN not in out.stdout + out.stderr

    out = run_cli("pipeline", "push", model, "--repo", "bob/x", "--endpoint", hub.url,  # not alice's namespace
                  env=sub_env(tmp_path, HF_TOKEN=TOKEN), timeout=120)
    assert out.returncode != 0 and "bob/x" in out.stderr and "(403)" in out.stderr, out.stderr

    out = run_cli("pipeline", "push", model, "--repo", "alice/x", "--endpoint", hub.url,
                  env=sub_env(tmp_path), timeout=120)  # no token at all
    assert out.returncode != 0 and "no Hugging Face token" in out.stderr


def test_token_is_never_written(hub, run, tmp_path):
    outs = []
    for artifact, repo, extra in ((run / "prepare", "alice/d", []), (run / "pretrain" / "model", "alice/m", []),
                                  (run / "sft" / "model", "alice/s", ["--private", "--revision", "dev"])):
        out = run_cli("pipeline", "push", str(artifact), "--repo", repo, "--endpoint", hub.url, *extra,
                      env=sub_env(tmp_path, HF_TOKEN=TOKEN), timeout=120)
        assert out.returncode == 0, out.stderr
        outs.append(out.stdout + out.stderr)
    assert out.stdout.strip() == "alice/s@dev" and "pushed to alice/s@dev" in out.stderr
    assert (run / ".pushes.json").exists()
    needle = TOKEN.encode()
    leaked = [p for p in run.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert leaked == []
    assert not any(TOKEN in o for o in outs)
    for (_repo_type, repo_id), repo in hub.repos.items():  # nor in anything uploaded (cards!)
        for commit in repo.commits.values():
            assert not any(needle in blob.data for blob in commit.files.values()), repo_id


def test_refuses_pickles_and_unpublished_folders(run, tmp_path):
    from pipeline.hub.push import PushError, push_artifact

    model = run / "pretrain" / "model"
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PushError, match=r"pickle-format weights \(pytorch_model.bin\)"):
        push_artifact(model, "alice/x", endpoint="http://127.0.0.1:9", token=TOKEN)
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "config.json").write_text("{}")
    with pytest.raises(PushError, match="not a published stage output"):
        push_artifact(loose, "alice/x", endpoint="http://127.0.0.1:9", token=TOKEN)
    with pytest.raises(PushError, match="not a hub repo name"):
        push_artifact(run / "prepare", "no-slash", endpoint="http://127.0.0.1:9", token=TOKEN)


def test_push_stage_outputs_and_settings(hub, run):
    from pipeline.hub.push import PushError, PushSettings, pending_pushes, push_stage_outputs
    from pipeline.recipe.config import ConfigError, from_dict

    settings = from_dict(PushSettings, {"repo": "alice/tiny-data", "revision": "v2", "private": True},
                         "stages.prepare.push")
    with pytest.raises(PushError, match="no Hugging Face token"):
        push_stage_outputs(run, "prepare", settings, endpoint=hub.url)
    assert pending_pushes(run, "prepare", settings, endpoint=hub.url) == ["dataset"]
    # the token comes from the environment, as in the runner
    os.environ["HF_TOKEN"] = TOKEN
    try:
        assert push_stage_outputs(run, "prepare", settings, endpoint=hub.url) == ["alice/tiny-data@v2"]
    finally:
        del os.environ["HF_TOKEN"]
    assert pending_pushes(run, "prepare", settings, endpoint=hub.url) == []
    repo = hub.repo("alice/tiny-data", "dataset")
    assert repo.private and "v2" in repo.branches and "train/dataset_info.json" in hub.files(repo.repo_id, "dataset", "v2")
    with pytest.raises(ConfigError, match=r"stages.sft.push.repo: 'nope' is not a hub repo name"):
        from_dict(PushSettings, {"repo": "nope"}, "stages.sft.push")
    with pytest.raises(ConfigError, match="stages.sft.push.privat: unknown key"):
        from_dict(PushSettings, {"repo": "a/b", "privat": True}, "stages.sft.push")


def test_hub_module_imports_no_hub_client():
    code = "import sys, pipeline.hub.push; sys.exit('huggingface_hub' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_recipe_push_runs_after_the_stage_and_only_once(hub, tmp_path):
    """`stages.NAME.push` in a recipe: the runner pushes after the stage; push settings never re-run it."""
    import pydoc_data.topics

    import yaml

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:20]))
    section = {"inputs": {"corpus": str(corpus)}, "vocab_size": 320}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": {"tokenizer": section}}))
    env = sub_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN)
    assert run_cli("pipeline", "run", str(recipe), env=env).returncode == 0
    finished = json.loads((tmp_path / "run" / "tokenizer" / "manifest.json").read_text())["finished"]

    section["push"] = {"repo": f"{USER}/tiny-tokenizer"}
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": {"tokenizer": section}}))
    out = run_cli("pipeline", "run", str(recipe), env=env)
    assert out.returncode == 0, out.stderr
    assert "tokenizer: up to date" in out.stdout and f"pushed to {USER}/tiny-tokenizer" in out.stdout
    assert json.loads((tmp_path / "run" / "tokenizer" / "manifest.json").read_text())["finished"] == finished
    files = hub.files(f"{USER}/tiny-tokenizer")
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    assert files["tokenizer.json"] == (tmp_path / "run" / "tokenizer" / "tokenizer" / "tokenizer.json").read_bytes()

    commits = hub.counts["commit"]
    out = run_cli("pipeline", "run", str(recipe), env=env)
    assert out.returncode == 0 and "pushed to" not in out.stdout and hub.counts["commit"] == commits

    section["push"] = {"repo": f"{USER}/other"}
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": {"tokenizer": section}}))
    out = run_cli("pipeline", "run", str(recipe), env={**env, "HF_TOKEN": "hf_wrong-test-token"})
    assert out.returncode == 1 and "push failed" in out.stderr and "stays done" in out.stderr
    assert "hf_wrong-test-token" not in out.stdout + out.stderr
    assert json.loads((tmp_path / "run" / "tokenizer" / "manifest.json").read_text())["complete"] is True
