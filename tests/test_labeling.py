"""Human-feedback labeling: judgement log, export formats, agreement, JSONL round trip, resume, the server."""

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli

from pipeline.data.preferences import to_groups
from pipeline.labeling import store as labeling
from pipeline.labeling.store import LabelError, LabelStore

ITEMS = [
    {"id": "s0", "prompt": "P0", "responses": ["a", "b", "c"]},
    {"id": "s1", "prompt": "P1", "responses": ["x", "y"]},
    {"id": "s2", "prompt": "P2", "responses": ["m", "n"]},
]


def new_session(folder: Path, items=ITEMS) -> LabelStore:
    labeling.write_samples(folder, [dict(i) for i in items], {"source": {"kind": "given"}})
    return LabelStore(folder)


def labeled_session(folder: Path) -> LabelStore:
    store = new_session(folder)
    store.add("s0", "bob", {"ranks": [0, 1, 2]})  # replaced below: the latest judgement wins
    store.add("s0", "ana", {"ranks": [1, 0, 1], "scores": [2, 5, 2]})  # b best, a and c tied
    store.add("s1", "ana", {"all_bad": True, "correction": "  z  ", "scores": [1, 3]})
    store.add("s2", "ana", {"scores": [4, None]})  # a partial rating orders nothing
    store.add("s0", "bob", {"ranks": [5, 3, 0]})  # stored as dense ranks [2, 1, 0]
    store.add("s2", "bob", {"ranks": [0, 0], "correction": "better"})  # a tie: no preference
    return store


def load_rows(path: Path) -> dict[str, list[dict]]:
    import datasets

    return {split: part.to_list() for split, part in datasets.load_from_disk(str(path)).items()}


# --- export ---

def test_export_formats_are_exactly_the_reward_and_sft_rows(tmp_path):
    labeled_session(tmp_path / "session")
    manifest = labeling.export(tmp_path / "session", tmp_path / "out", validation_fraction=0)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["judgements.jsonl", "manifest.json", "pairs", "rankings",
                                                    "ratings", "sft"]
    ana, bob = {"labeler": "ana"}, {"labeler": "bob"}
    assert load_rows(out / "rankings") == {"train": [
        {"id": "s0", **ana, "prompt": "P0", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]},
        {"id": "s0", **bob, "prompt": "P0", "responses": ["a", "b", "c"], "ranks": [2, 1, 0]},
        {"id": "s1", **ana, "prompt": "P1", "responses": ["z", "x", "y"], "ranks": [0, 1, 1]},  # correction on top
    ]}
    assert load_rows(out / "pairs") == {"train": [
        {"id": "s0", **ana, "prompt": "P0", "chosen": "b", "rejected": "a", "margin": 1.0},
        {"id": "s0", **ana, "prompt": "P0", "chosen": "b", "rejected": "c", "margin": 1.0},
        {"id": "s0", **bob, "prompt": "P0", "chosen": "c", "rejected": "b", "margin": 1.0},
        {"id": "s0", **bob, "prompt": "P0", "chosen": "c", "rejected": "a", "margin": 2.0},
        {"id": "s0", **bob, "prompt": "P0", "chosen": "b", "rejected": "a", "margin": 1.0},
        {"id": "s1", **ana, "prompt": "P1", "chosen": "z", "rejected": "x", "margin": 1.0},
        {"id": "s1", **ana, "prompt": "P1", "chosen": "z", "rejected": "y", "margin": 1.0},
    ]}
    assert load_rows(out / "ratings") == {"train": [  # all bad (s1) gives no ratings; unscored responses none
        {"id": "s0", **ana, "prompt": "P0", "response": "a", "rating": 2.0},
        {"id": "s0", **ana, "prompt": "P0", "response": "b", "rating": 5.0},
        {"id": "s0", **ana, "prompt": "P0", "response": "c", "rating": 2.0},
        {"id": "s2", **ana, "prompt": "P2", "response": "m", "rating": 4.0},
    ]}
    assert load_rows(out / "sft") == {"train": [
        {"id": "s1", **ana, "messages": [{"role": "user", "content": "P1"}, {"role": "assistant", "content": "z"}]},
        {"id": "s2", **bob, "messages": [{"role": "user", "content": "P2"}, {"role": "assistant", "content": "better"}]},
    ]}
    # what the reward stage makes of them: a's and c's tie gives no pair; all bad gives none among x, y
    groups, stats = to_groups(load_rows(out / "rankings")["train"], "rankings")
    assert [sorted(p[:2] for p in g["pairs"]) for g in groups] == [[(1, 0), (1, 2)], [(1, 0), (2, 0), (2, 1)],
                                                                   [(0, 1), (0, 2)]]
    assert stats["dropped_ties"] == 1 + 0 + 1
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["complete"] is True and on_disk["stage"] == "label" and on_disk["fingerprint"] == manifest["fingerprint"]
    assert on_disk["outputs"] == ["pairs", "rankings", "ratings", "sft"]
    m = on_disk["metrics"]
    assert m["judgements"] == 5 and m["items_judged"] == 3 and m["no_preference"] == 2  # s2 by ana and by bob
    assert m["labelers"]["ana"] == {"judgements": 3, "ranked": 1, "scored": 3, "all_bad": 1, "corrections": 1}
    assert m["rows"] == {"rankings": {"train": 3}, "ratings": {"train": 4}, "pairs": {"train": 7}, "sft": {"train": 2}}
    who = [(j["id"], j["labeler"]) for j in map(json.loads, (out / "judgements.jsonl").read_text().splitlines())]
    assert who == [("s0", "ana"), ("s0", "bob"), ("s1", "ana"), ("s2", "ana"), ("s2", "bob")]


def test_export_options_fingerprint_and_prompt_level_split(tmp_path):
    store = labeled_session(tmp_path / "session")
    first = labeling.export(tmp_path / "session", tmp_path / "a", validation_fraction=0)
    assert labeling.export(tmp_path / "session", tmp_path / "a", validation_fraction=0)["fingerprint"] == first["fingerprint"]
    always = labeling.export(tmp_path / "session", tmp_path / "always", validation_fraction=0, correction_preferred="always")
    assert always["fingerprint"] != first["fingerprint"]
    rows = load_rows(tmp_path / "always" / "rankings")["train"]
    assert {"id": "s2", "labeler": "bob", "prompt": "P2", "responses": ["better", "m", "n"], "ranks": [0, 1, 1]} in rows
    labeling.export(tmp_path / "session", tmp_path / "never", validation_fraction=0, correction_preferred="never")
    assert [r["id"] for r in load_rows(tmp_path / "never" / "rankings")["train"]] == ["s0", "s0"]

    store.add("s1", "bob", {"ranks": [1, 0]})  # a new judgement changes the fingerprint
    assert labeling.export(tmp_path / "session", tmp_path / "a", validation_fraction=0)["fingerprint"] != first["fingerprint"]
    labeling.export(tmp_path / "session", tmp_path / "split", validation_fraction=0.5)
    splits = load_rows(tmp_path / "split" / "ratings")
    assert {r["id"] for r in splits["train"]}.isdisjoint({r["id"] for r in splits["validation"]})  # a prompt on one side
    assert len(splits["train"]) + len(splits["validation"]) == 4
    with pytest.raises(LabelError, match="no judgements"):
        labeling.export(new_session(tmp_path / "empty").folder, tmp_path / "nothing")


# --- agreement ---

def test_kendall_tau_and_pairwise_agreement_between_labelers(tmp_path):
    assert labeling.kendall_tau_b([0, 1, 2], [0, 1, 2]) == 1.0
    assert labeling.kendall_tau_b([0, 1, 2], [2, 1, 0]) == -1.0
    assert labeling.kendall_tau_b([0, 0], [0, 1]) is None  # one side ranks everything equal
    # tau-b with ties: x=[0,0,1,2], y=[0,1,1,2]: C=4, D=0, ties only in x 1, only in y 1 -> 4/sqrt(5*5)
    assert labeling.kendall_tau_b([0, 0, 1, 2], [0, 1, 1, 2]) == pytest.approx(0.8)

    store = labeled_session(tmp_path / "session")
    store.add("s1", "bob", {"ranks": [0, 1]})  # ana marked s1 all bad: every pair a tie for her
    store.add("s0", "cy", {"scores": [1, 5, 1]})  # a full set of scores orders too: like ana's ranks
    result = labeling.agreement(store.items, store.latest())
    by_pair = {tuple(p["labelers"]): p for p in result["pairs"]}
    assert result["labelers"] == ["ana", "bob", "cy"]
    # s0: ana [1,0,1] vs bob [2,1,0]: (a,b) both prefer b, (a,c) ana ties, (b,c) they disagree -> 1 of 2
    assert by_pair[("ana", "bob")]["shared_prompts"] == 2  # s0 and s1 (s2: ana's partial scores order nothing)
    assert by_pair[("ana", "bob")]["compared_pairs"] == 2 and by_pair[("ana", "bob")]["agreement_rate"] == 0.5
    assert by_pair[("ana", "bob")]["kendall_tau"] == 0.0  # s0: C=1, D=1; s1: undefined (all tie), left out
    assert by_pair[("ana", "cy")]["agreement_rate"] == 1.0 and by_pair[("ana", "cy")]["kendall_tau"] == 1.0
    assert by_pair[("bob", "cy")]["agreement_rate"] == 0.5
    assert result["overall"]["compared_pairs"] == 2 + 2 + 2
    assert result["overall"]["agreement_rate"] == pytest.approx(4 / 6)
    manifest = labeling.export(tmp_path / "session", tmp_path / "out")
    assert manifest["metrics"]["agreement"] == json.loads(json.dumps(result))


# --- interoperability ---

def test_samples_and_labels_jsonl_round_trip(tmp_path):
    labeled_session(tmp_path / "a")
    out = run_cli("pipeline", "label-export", str(tmp_path / "a"), "--samples-jsonl", str(tmp_path / "samples.jsonl"),
                  "--labels-jsonl", str(tmp_path / "labels.jsonl"), "--out", str(tmp_path / "export_a"))
    assert out.returncode == 0, out.stderr
    assert "published" in out.stdout and "agreement" in out.stdout
    samples = labeling.read_jsonl(tmp_path / "samples.jsonl")
    assert samples == ITEMS
    # a fresh session built from the label file alone reproduces the export exactly
    out = run_cli("pipeline", "label-import", str(tmp_path / "labels.jsonl"), "--dir", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    b = labeling.export(tmp_path / "b", tmp_path / "export_b")
    a = json.loads((tmp_path / "export_a" / "manifest.json").read_text())
    assert b["fingerprint"] == a["fingerprint"]
    for name in labeling.FORMATS:
        assert load_rows(tmp_path / "export_b" / name) == load_rows(tmp_path / "export_a" / name)

    # another tool's labels: ids only, one labeler for the file; a bad line writes nothing
    new_session(tmp_path / "c")
    (tmp_path / "theirs.jsonl").write_text(json.dumps({"id": "s1", "ranks": [1, 0]}) + "\n" +
                                           json.dumps({"id": "s0", "prompt": "not P0", "ranks": [0, 1, 2]}) + "\n")
    out = run_cli("pipeline", "label-import", str(tmp_path / "theirs.jsonl"), "--dir", str(tmp_path / "c"), "--labeler", "vendor")
    assert out.returncode == 2 and "theirs.jsonl:2: prompt differs" in out.stderr
    assert LabelStore(tmp_path / "c").latest() == {}
    (tmp_path / "theirs.jsonl").write_text(json.dumps({"id": "s1", "ranks": [1, 0]}) + "\n")
    assert labeling.import_labels(tmp_path / "theirs.jsonl", tmp_path / "c", "vendor") == 1
    record = LabelStore(tmp_path / "c").judgement("s1", "vendor")
    assert record["ranks"] == [1, 0] and record["via"] == "import:theirs.jsonl"


def test_bad_judgements_are_refused_with_a_reason(tmp_path):
    store = new_session(tmp_path / "s")
    for raw, message in [({"ranks": [0, 1]}, "expected 3"), ({"ranks": [0, -1, 1]}, "non-negative"),
                         ({"scores": [1, "x", 2]}, "not a finite number"), ({"all_bad": "yes"}, "true or false"),
                         ({"correction": "   "}, "empty judgement"), ({}, "empty judgement")]:
        with pytest.raises(LabelError, match=message):
            store.add("s0", "ana", raw)
    with pytest.raises(LabelError, match="unknown item"):
        store.add("nope", "ana", {"ranks": [0, 1]})
    with pytest.raises(LabelError, match="labeler"):
        store.add("s1", "", {"ranks": [0, 1]})
    assert (tmp_path / "s" / labeling.JUDGEMENTS).read_text() == ""


# --- resume and durability ---

def test_resume_position_latest_wins_and_torn_tail(tmp_path):
    store = new_session(tmp_path / "s", ITEMS + [{"id": "s3", "prompt": "P3", "responses": ["u", "v"]}])
    assert store.resume_index("ana") == 0 and store.progress("ana") == (0, 4)
    store.add("s0", "ana", {"ranks": [0, 1, 2]})
    store.add("s2", "ana", {"ranks": [0, 1]})
    store.add("s1", "bob", {"ranks": [0, 1]})
    assert store.resume_index("ana") == 1  # the first prompt she has not judged, not the one after her last
    assert store.resume_index("ana", after=1) == 3  # after saving prompt 2 the page moves on to 4
    assert store.resume_index("bob") == 0 and store.progress("ana") == (2, 4)
    # a server killed mid-write leaves a torn line: never acknowledged, ignored, then cut off
    with open(tmp_path / "s" / labeling.JUDGEMENTS, "a") as f:
        f.write('{"id": "s1", "labeler": "ana", "ran')
    reopened = LabelStore(tmp_path / "s")
    assert reopened.progress("ana") == (2, 4) and reopened.resume_index("ana") == 1
    reopened.add("s1", "ana", {"scores": [3, 4]})
    reopened.add("s0", "ana", {"ranks": [2, 1, 0]})
    lines = (tmp_path / "s" / labeling.JUDGEMENTS).read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)
    assert LabelStore(tmp_path / "s").judgement("s0", "ana")["ranks"] == [2, 1, 0]
    assert store.resume_index("ana") == 3  # the first store sees the other writer's lines too
    assert labeling.display_order("s0", "ana", 3) == labeling.display_order("s0", "ana", 3)  # same after a reload
    assert sorted(labeling.display_order("s0", "ana", 3)) == [0, 1, 2]


def start_server(folder: Path, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "label", "--out", str(folder), "--port", "0", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if match := re.search(r"open (http://127\.0\.0\.1:\d+/)", line):
            return proc, match.group(1)
    raise AssertionError("server did not start: " + "".join(lines))


def call(url: str, body: dict | None = None, headers: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def test_server_sigkill_loses_no_acknowledged_judgement_and_is_locked_down(tmp_path):
    given = tmp_path / "given.jsonl"
    given.write_text("".join(json.dumps({"prompt": i["prompt"], "responses": i["responses"]}) + "\n" for i in ITEMS))
    proc, url = start_server(tmp_path / "s", "--prompts", str(given), "--labeler", "ana")
    try:
        status, headers, page = call(url + "api/session")
        assert status == 200 and page == {"labeler": "ana", "total": 3, "done": 0, "resume": 0, "folder": str(tmp_path / "s")}
        assert "script-src 'self'" in headers["Content-Security-Policy"] and "unsafe-inline" not in headers["Content-Security-Policy"]
        html = urllib.request.urlopen(url, timeout=10).read().decode()
        assert '<script src="/static/app.js"' in html and "<script>" not in html  # no inline script
        saved = []
        for index, body in enumerate([{"ranks": [0, 1, 1]}, {"all_bad": True, "correction": "fixed"}]):
            status, _, answer = call(url + "api/judgement", {"index": index, **body})
            assert status == 200, answer
            saved.append(answer["saved"])
        assert answer["done"] == 2 and answer["next"] == 2
        status, _, answer = call(url + "api/judgement", {"index": 2, "ranks": [0]})
        assert status == 400 and "expected 2" in answer["error"]
        status, _, _ = call(url + "api/session", headers={"Host": "attacker.example:80"})
        assert status == 403  # DNS rebinding
        status, _, _ = call(url + "api/judgement", {"index": 2, "ranks": [0, 1]}, {"Origin": "http://attacker.example"})
        assert status == 403
        status, _, _ = call(url + "api/judgement", {"index": 2, "ranks": [0, 1]}, {"Content-Type": "text/plain"})
        assert status == 415
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown, no flush at exit
        proc.wait(timeout=10)
    store = LabelStore(tmp_path / "s")
    assert [store.judgement(i, "ana") for i in ("s00000", "s00001")] == saved and store.judgement("s00002", "ana") is None
    proc, url = start_server(tmp_path / "s", "--labeler", "ana")  # resume: no --prompts needed
    try:
        assert call(url + "api/session")[2]["resume"] == 2
        assert call(url + "api/item/1")[2]["judgement"] == saved[1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- sampling ---

def test_label_samples_k_responses_from_a_checkpoint_or_a_recipe(base_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Repeat: alpha"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "Repeat: bravo"}]}) + "\n")
    store = labeling.start_session(tmp_path / "s", prompts, str(base_model), 3, max_new_tokens=6, seed=1)
    assert [i["prompt"] for i in store.items] == ["Repeat: alpha", "Repeat: bravo"]
    assert all(len(i["responses"]) == 3 and all(isinstance(r, str) for r in i["responses"]) for i in store.items)
    assert len({r for i in store.items for r in i["responses"]}) > 1  # sampled, not greedy copies
    session = json.loads((tmp_path / "s" / labeling.SESSION).read_text())
    assert session["source"]["kind"] == "checkpoint" and session["source"]["responses"] == 3

    # a recipe stands for its published sft model
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": {"sft": {
        "inputs": {"model": str(base_model), "data": str(prompts)}}}}))
    with pytest.raises(LabelError, match="neither its sft nor its ppo stage"):
        labeling.resolve_model(str(recipe))
    published = tmp_path / "run" / "sft"
    (published / "model").mkdir(parents=True)
    (published / "model" / "config.json").write_text("{}")
    (published / "manifest.json").write_text(json.dumps({"complete": True, "fingerprint": "x"}))
    assert labeling.resolve_model(str(recipe)) == published / "model"
    out = run_cli("pipeline", "label", "--prompts", str(prompts), "--out", str(tmp_path / "none"))
    assert out.returncode == 2 and "no `responses` column, and no checkpoint" in out.stderr
