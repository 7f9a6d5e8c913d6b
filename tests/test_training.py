"""The shared training loop: schedule, loss falls, export, resume, crash, NaN, bad settings."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import one_thread, pretrain_recipe, write_packed_data  # noqa: E402

from pipeline.data.packing import ShiftedBlocks, collate_blocks, token_byte_lengths  # noqa: E402
from pipeline.recipe.settings import ModelSettings, TrainSettings  # noqa: E402
from pipeline.train import loop as training  # noqa: E402
from pipeline.train import models
from pipeline.train.distributed import make_accelerator  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelSettings(size="nano", max_seq_len=64)

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(tokenizer, train blocks, validation blocks, folders) of a small repetitive corpus, 32-token blocks."""
    import datasets
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("packed")
    tok_dir, data_dir = write_packed_data(root)
    data = datasets.load_from_disk(str(data_dir))
    return (AutoTokenizer.from_pretrained(tok_dir), data["train"].with_format("numpy"),
            data["validation"].with_format("numpy"), tok_dir, data_dir)


def settings(**kw) -> TrainSettings:
    base = dict(max_steps=8, micro_batch_size=4, grad_accum_steps=2, learning_rate=3e-3, warmup_steps=2,
                eval_every=1000, save_every=1000, log_every=4)
    return TrainSettings(**{**base, **kw})


def build(packed, model_settings=MODEL):
    tok = packed[0]
    torch.manual_seed(0)
    return models.build_model(model_settings, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def run_training(packed, work_dir, train_settings, loss_fn=None, evaluate=False, train_data=None,
                 model_settings=MODEL):
    tok, all_train, val_data, *_ = packed
    train_data = all_train if train_data is None else train_data
    accelerator = make_accelerator(train_settings.grad_accum_steps, None, micro_batch_size=train_settings.micro_batch_size)
    model = build(packed, model_settings)
    evaluator = training.make_lm_evaluator(accelerator, val_data, collate_blocks, 4, 4, token_byte_lengths(tok)) if evaluate else None
    loss_fn = loss_fn or (lambda m, b: models.causal_lm_loss(m, b, model_settings))
    model, summary = training.train(accelerator, model, train_data, collate_blocks, loss_fn, train_settings, work_dir,
                                    seed=0, run_start=time.time() - 100, evaluate=evaluator)
    return accelerator, model, summary


def losses(work_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(work_dir) / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


# --- schedule and optimizer ---

def test_lr_schedules():
    cos = TrainSettings(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    f = [training.lr_multiplier(s, cos) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=1e-3)
    wsd = TrainSettings(max_steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    g = [training.lr_multiplier(s, wsd) for s in range(100)]
    assert g[10:80] == [1.0] * 70 and g[80] < 1.0 and g[-1] == pytest.approx(0.0)
    const = TrainSettings(max_steps=100, warmup_steps=0, schedule="constant")
    assert {training.lr_multiplier(s, const) for s in range(100)} == {1.0}
    # a time budget: the schedule follows whichever of steps and time is further along
    assert training.lr_multiplier(20, wsd, time_fraction=0.9) == pytest.approx(0.5)
    assert training.lr_multiplier(90, wsd, time_fraction=0.5) == g[90]
    assert training.lr_multiplier(20, wsd, time_fraction=1.0) == pytest.approx(0.0)
    assert training.lr_multiplier(20, cos, time_fraction=1.0) == pytest.approx(0.1)
    assert training.lr_multiplier(5, cos, time_fraction=1.0) == f[5]  # warmup stays in steps


def test_time_budget_stops_training_decays_the_rate_and_saves_the_last_step(packed, tmp_path):
    s = settings(max_steps=100_000, grad_accum_steps=1, warmup_steps=2, schedule="wsd", decay_fraction=0.5,
                 min_lr_ratio=0.0, max_train_seconds=2.0, save_every=10)
    _, _, summary = run_training(packed, tmp_path, s, evaluate=True)
    steps = summary["steps"]
    assert summary["stopped_by_time_budget"] and 10 < steps < 100_000
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(lrs) == steps and max(lrs) == pytest.approx(s.learning_rate)
    assert lrs[-1] < 0.2 * s.learning_rate  # decayed with the clock, not with max_steps
    assert training.list_checkpoints(tmp_path)[-1].name == f"step-{steps:06d}"
    saved = json.loads((training.list_checkpoints(tmp_path)[-1] / training.STATE_FILE).read_text())
    assert saved["train_seconds"] >= 2.0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == steps
    # the budget is spent: running again resumes at the end instead of training on
    _, _, again = run_training(packed, tmp_path, s, evaluate=True)
    assert again["resumed_from_step"] == steps and again["steps"] == steps


def test_weight_decay_only_on_matrices():
    model = models.build_model(ModelSettings(size="nano", max_seq_len=64, tie_embeddings=False), 300, 0, 1, 2)
    opt = training.build_optimizer(model, TrainSettings(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed and all(".weight" in n and "norm" not in n and "embed" not in n and "lm_head" not in n for n in decayed)
    assert "model.embed_tokens.weight" in plain and "lm_head.weight" in plain
    assert any("norm" in n for n in plain)
    assert len(decayed) + len(plain) == len(names)



def test_embedding_lr_scale_speeds_up_the_input_embedding_only(packed, tmp_path):
    untied = ModelSettings(size="nano", max_seq_len=64, tie_embeddings=False)
    before = dict(build(packed, untied).named_parameters())  # the same seeded init run_training builds
    after = {}
    for scale in (1.0, 10.0):
        s = settings(max_steps=1, grad_accum_steps=1, warmup_steps=0, embedding_lr_scale=scale)
        accelerator, model, _ = run_training(packed, tmp_path / str(scale), s, model_settings=untied)
        after[scale] = {n: p.detach() - before[n].detach() for n, p in accelerator.unwrap_model(model).named_parameters()}
    emb = "model.embed_tokens.weight"
    assert after[1.0][emb].abs().sum() > 0
    # the first AdamW step moves each touched row by ~lr: ten times as far at scale 10
    torch.testing.assert_close(after[10.0][emb], 10 * after[1.0][emb], rtol=1e-4, atol=1e-9)
    for name, delta in after[1.0].items():
        if name != emb:  # the head and every other weight: the same step at either scale
            torch.testing.assert_close(after[10.0][name], delta, rtol=0, atol=0)


def test_muon_updates_hidden_matrices_as_torch_muon_and_the_rest_with_adamw():
    torch.manual_seed(0)
    model = models.build_model(ModelSettings(size="nano", max_seq_len=64, tie_embeddings=False), 300, 0, 1, 2)
    opt = training.build_optimizer(model, TrainSettings(optimizer="muon", learning_rate=0.02, weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in opt.param_groups[0]["params"]}
    # every projection of every layer, and nothing else (embeddings, head and norms stay with AdamW)
    assert muon == {n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n}
    assert len(muon) == 2 * 7
    adamw = {names[id(p)] for g in opt.param_groups[1:] for p in g["params"]}
    assert adamw | muon == set(names.values()) and not adamw & muon

    # reference: torch's own Muon ("match_rms_adamw") and AdamW on copies, same gradients, two steps
    params = dict(model.named_parameters())
    copies = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    ref_muon = torch.optim.Muon([copies[n] for n in sorted(muon)], lr=0.02, weight_decay=0.1,
                                adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([{"params": [copies[names[id(p)]] for p in g["params"]],
                                    "weight_decay": g["weight_decay"]} for g in opt.param_groups[1:]],  # our split
                                  lr=0.02, betas=(0.9, 0.95), eps=1e-8)
    start = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(2):
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        for n in params:
            params[n].grad, copies[n].grad = grads[n].clone(), grads[n].clone()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    for n, p in params.items():
        moved = (p.detach() - start[n]).abs().max()
        assert moved > 1e-3, n
        tol = 0.05 * moved if n in muon else 1e-6  # Newton-Schulz runs in bf16 (as torch's does)
        assert (p.detach() - copies[n].detach()).abs().max() <= tol, n

    # a round trip through state_dict restores both halves (momentum buffers and Adam moments)
    state = opt.state_dict()
    again = training.build_optimizer(model, TrainSettings(optimizer="muon", learning_rate=0.02, weight_decay=0.1))
    again.load_state_dict(state)
    for n in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        p = params[n]
        for key, value in opt.state[p].items():
            assert torch.equal(again.state[p][key], value), (n, key)
    assert again.adamw.state is again.state and again.adamw.param_groups[0] is again.param_groups[1]


# --- training behaviour ---

def test_validation_loss_falls_and_metrics_are_written(packed, tmp_path):
    s = settings(max_steps=40, grad_accum_steps=1, micro_batch_size=8, eval_every=10, learning_rate=5e-3)
    _, _, summary = run_training(packed, tmp_path, s, evaluate=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert set(rows[0]) == {"step", "tokens", "val_loss", "val_bpb", "elapsed_s"}
    assert rows[-1]["tokens"] == 40 * 8 * 32 and rows[0]["elapsed_s"] >= 100  # run_start was 100 s ago
    first, last = rows[0]["val_loss"], rows[-1]["val_loss"]
    assert last < 0.6 * first, rows
    assert summary["final_val_loss"] == last and summary["final_val_bpb"] < rows[0]["val_bpb"]
    assert last < math.log(300) / 2  # far below a uniform guess


def test_accumulation_and_activation_checkpointing_keep_the_loss_curve(packed, tmp_path):
    # one global batch of 8 blocks: 8 x 1, 2 x 4 accumulated, and 2 x 4 with recomputed activations
    run_training(packed, tmp_path / "a", settings(max_steps=4, micro_batch_size=8, grad_accum_steps=1))
    run_training(packed, tmp_path / "b", settings(max_steps=4, micro_batch_size=2, grad_accum_steps=4))
    acc, model, _ = run_training(packed, tmp_path / "c", settings(max_steps=4, micro_batch_size=2, grad_accum_steps=4,
                                                                  activation_checkpointing=True))
    assert acc.unwrap_model(model).is_activation_checkpointing
    a, b, c = (list(losses(tmp_path / x).values()) for x in "abc")
    assert len(a) == 4 and a[-1] < a[0]
    assert b == pytest.approx(a, rel=1e-5) and c == pytest.approx(a, rel=1e-5)


def test_bits_per_byte_counts_text_bytes_only(packed):
    tok, _, val_data, *_ = packed
    accelerator = make_accelerator(1, None)
    torch.manual_seed(1)
    model = models.build_model(MODEL, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id).eval()
    lengths = token_byte_lengths(tok)
    result = training.make_lm_evaluator(accelerator, val_data, collate_blocks, 4, 2, lengths)(model)
    batch = collate_blocks([val_data[i] for i in range(8)])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][:, :-1], position_ids=batch["position_ids"][:, :-1],
                       use_cache=False).logits
    targets = batch["input_ids"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    text = lengths[targets.flatten()] > 0
    assert result["val_loss"] == pytest.approx(ce.mean().item(), rel=1e-5)
    bpb = ce[text].sum().item() / math.log(2) / lengths[targets.flatten()].sum().item()
    assert result["val_bpb"] == pytest.approx(bpb, rel=1e-5)
    # eval_batches: null evaluates the whole split
    whole = training.make_lm_evaluator(accelerator, val_data, collate_blocks, 4, None, lengths)(model)
    enough = training.make_lm_evaluator(accelerator, val_data, collate_blocks, 4, -(-len(val_data) // 4), lengths)(model)
    assert len(val_data) > 8 and whole == pytest.approx(enough) and whole["val_loss"] != result["val_loss"]


def test_export_reloads_in_fresh_process_with_identical_logits(packed, tmp_path):
    tok, train_data, *_ = packed
    accelerator, model, _ = run_training(packed, tmp_path / "work", settings(max_steps=3))
    out = tmp_path / "model"
    training.export_model(accelerator, model, out, tok)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin"))
    batch = collate_blocks([train_data[i] for i in range(2)])
    ids = batch["input_ids"][:, :-1]
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = accelerator.unwrap_model(model).eval()(input_ids=ids).logits
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "g = GenerationConfig.from_pretrained(sys.argv[1]); assert g.eos_token_id == m.config.eos_token_id == 1\n"
            "torch.save(m(input_ids=torch.load(sys.argv[2])).logits.detach(), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                   check=True, cwd=tmp_path, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("optimizer,shift", [("adamw", False), ("muon", False), ("adamw", True)])
def test_resume_follows_the_uninterrupted_loss_curve(packed, tmp_path, optimizer, shift):
    s = settings(max_steps=8, save_every=3, keep_checkpoints=2, optimizer=optimizer)
    data = None
    if shift:  # 20 blocks, 8 per step: a new epoch, read at a new offset, every 2 steps
        data = ShiftedBlocks(packed[1].select(range(20)), seed=0)
        run_training(packed, tmp_path / "unshifted", s, train_data=data.blocks)
    run_training(packed, tmp_path / "straight", s, train_data=data)
    straight = losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 9))
    if shift:  # the first epoch reads the stored blocks, later ones other windows
        unshifted = losses(tmp_path / "unshifted")
        assert [straight[i] == unshifted[i] for i in range(1, 9)] == [True] * 2 + [False] * 6

    class Crash(Exception):
        pass

    calls = []

    def crash_in_step_6(model, batch):  # steps 1-5 run (and are logged), then the process dies
        calls.append(1)
        if len(calls) > 5 * s.grad_accum_steps:
            raise Crash
        return models.causal_lm_loss(model, batch, MODEL)

    with pytest.raises(Crash):
        run_training(packed, tmp_path / "resumed", s, loss_fn=crash_in_step_6, train_data=data)
    assert sorted(losses(tmp_path / "resumed")) == [1, 2, 3, 4, 5]
    assert [p.name for p in training.list_checkpoints(tmp_path / "resumed")] == ["step-000003"]
    _, _, summary = run_training(packed, tmp_path / "resumed", s, train_data=data)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 8
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))  # steps 4-5 of the crashed attempt were replaced
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    # keep_checkpoints=2 and a final save at max_steps
    assert [p.name for p in training.list_checkpoints(tmp_path / "resumed")] == ["step-000006", "step-000008"]


def test_kill_9_loses_at_most_the_steps_since_the_last_checkpoint(packed, tmp_path):
    data_dir = packed[4]
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "tests" / "pretrain_train_script.py"), str(data_dir), str(work),
           "--max-steps", "16", "--save-every", "4", "--delay", "0.3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = work / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished or failed before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = losses(work)
    killed_at = max(before)
    saved = training.list_checkpoints(work)
    last_saved = int(saved[-1].name.split("-")[1])
    assert killed_at - last_saved <= 4 and last_saved >= 8
    from pretrain_train_script import train_nano

    summary = train_nano(data_dir, work, max_steps=16, save_every=4)  # the same run, resumed in this process
    assert summary["resumed_from_step"] == last_saved and summary["steps"] == 16
    after = losses(work)
    assert sorted(after) == list(range(1, 17))
    for step in range(1, killed_at + 1):  # the replayed steps reproduce the killed run
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=1e-7), step
    assert not list((work / "checkpoints").glob("*.tmp"))


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(packed, tmp_path):
    s = settings(max_steps=8, save_every=2, grad_accum_steps=1)
    calls = {"n": 0}

    def poisoned(model, batch):
        loss, aux = models.causal_lm_loss(model, batch, MODEL)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 5 else loss), aux

    with pytest.raises(training.NonFiniteLossError, match="at step 5"):
        run_training(packed, tmp_path, s, loss_fn=poisoned)
    assert [p.name for p in training.list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


# --- bad settings fail before training ---

def _stage(argv, capsys):
    from pipeline.runner.stage import stage_main
    from stages.pretrain import run

    with pytest.raises(SystemExit) as exit_info:
        stage_main("pretrain", run, argv=argv)
    return exit_info.value.code, capsys.readouterr().err


def test_bad_values_fail_before_training_naming_the_key(packed, tmp_path, capsys):
    import yaml

    tok_dir, data_dir = packed[3], packed[4]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(pretrain_recipe(tmp_path / "run", tok_dir, data_dir)))
    code, err = _stage([str(recipe), "stages.pretrain.learning_rate=-0.1"], capsys)
    assert code == 2 and "stages.pretrain.learning_rate" in err
    # the packed blocks hold 32 tokens; a model with 16 positions cannot read them
    code, err = _stage([str(recipe), "model.max_seq_len=16"], capsys)
    assert code == 1 and "model.max_seq_len" in err and "32" in err
    assert not (tmp_path / "run" / ".work" / "pretrain" / "checkpoints").exists()
    assert not (tmp_path / "run" / "pretrain").exists()


# page faults per training step of a model whose logits (8 x 64 x 2048 floats = 4 MB) glibc serves
# from memory it hands back to the kernel after every step unless told to keep it
HEAP_PROBE = r"""
import resource, sys, torch
torch.set_num_threads(1)
from pipeline.train import distributed
from pipeline.train import models
from pipeline.recipe.settings import ModelSettings
if sys.argv[1] == "keep":
    assert distributed.keep_freed_memory(), "mallopt was refused"
settings = ModelSettings(family="dense", size="tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, ffn_dim=64,
                         max_seq_len=64)
torch.manual_seed(0)
model = models.build_model(settings, 2048, 1, 2, 0)
batch = {"input_ids": torch.randint(3, 2048, (8, 65))}
def step():
    loss, _ = models.causal_lm_loss(model, batch, settings)
    loss.backward()
    model.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_training_steps_stop_page_faulting_their_memory_back_in():
    def faults_per_step(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[-1])

    default, kept = faults_per_step("default"), faults_per_step("keep")
    if default < 250:  # a quarter of the logits' 1000 pages: this malloc keeps its memory anyway
        pytest.skip(f"the default allocator page-faults only {default} times per step here")
    assert kept * 4 < default, (kept, default)
