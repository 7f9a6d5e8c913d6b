"""PPO throughput and reward gain: our pipeline.rl.ppo_trainer.PPOTrainer against TRL 1.12's
trl.experimental.ppo.PPOTrainer on identical tiny models, prompts and settings (CPU, one thread).

TRL's PPOTrainer was removed after 1.12, so the TRL side runs under a separate virtual environment:

    python -m venv /tmp/trl112
    /tmp/trl112/bin/pip install torch==2.13.0 'trl==1.12.*'     # torch first: no CUDA build

Steps (the --compare mode runs all of them, one process after the other, and prints a table):

    python benchmarks/bench_ppo.py --make-checkpoint /tmp/ppo_ckpt
    OMP_NUM_THREADS=1 python benchmarks/bench_ppo.py --impl ours --checkpoint /tmp/ppo_ckpt --out ours.json
    OMP_NUM_THREADS=1 /tmp/trl112/bin/python benchmarks/bench_ppo.py --impl trl --checkpoint /tmp/ppo_ckpt --out trl.json
    python benchmarks/bench_ppo.py --compare --trl-python /tmp/trl112/bin/python

The checkpoint folder holds everything both sides load: policy (LlamaForCausalLM; also the reference
model), value model (LlamaForSequenceClassification, random init), reward model (a
LlamaForSequenceClassification with hand-set weights whose score rises with the fraction of TARGET
tokens in the sequence), a word-level tokenizer and prompts.json. It is built with plain
transformers/tokenizers code, so `--impl trl` never imports `pipeline` (TRL's venv lacks it).

Timing: model loading, trainer construction and process start are excluded. The first PPO step is a
warm-up and is excluded too. The timed span covers PPO steps 2..N end to end, as each trainer runs
them: batch fetch, sampling, frozen forwards (reference, value, reward), advantages, PPO epochs,
per-step metrics (and, for TRL, its own per-step logging, gc.collect() and lr-scheduler step; its
console printer callbacks are removed). episodes/s = timed episodes / timed seconds.

Reward: the reward model's mean score per step (after the missing-EOS penalty, if one is set; none
by default); "first"/"last" are the means over the first and last k steps (step 1 included in first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# one thread everywhere, before torch is imported (FACTS: "CPU threads")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# token ids of the benchmark vocabulary
PAD, BOS, EOS, UNK, TARGET = 0, 1, 2, 3, 5
FIRST_PROMPT_TOKEN = 6  # prompts use ids >= 6, so they never contain TARGET (or EOS/PAD)


# ---------------------------------------------------------------------------
# checkpoint (plain transformers; used by both sides)


def make_checkpoint(out: Path, args) -> dict:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    V = args.vocab
    names = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, V)]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )
    tokenizer.save_pretrained(out / "tokenizer")

    def cfg(**kw):
        base = dict(
            vocab_size=V, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=256,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
        )
        base.update(kw)
        return LlamaConfig(**base)

    torch.manual_seed(args.model_seed)
    policy = LlamaForCausalLM(cfg())
    policy.generation_config.pad_token_id = PAD
    policy.generation_config.eos_token_id = EOS
    policy.save_pretrained(out / "policy")
    value_cfg = cfg()
    value_cfg.num_labels = 1
    LlamaForSequenceClassification(value_cfg).save_pretrained(out / "value")

    # reward model: 1 layer, 1 head, hidden 8, all-zero queries/keys -> uniform attention over the attended
    # tokens; values copy the "is TARGET" feature, so the last position sees frac = (#TARGET / #tokens);
    # after the final RMSNorm the score is 8 frac / sqrt(1 + 8 frac^2): monotone in frac, in [0, 2.83)
    rm_cfg = cfg(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
    rm_cfg.num_labels = 1
    rm = LlamaForSequenceClassification(rm_cfg)
    with torch.no_grad():
        for p in rm.parameters():
            p.zero_()
        for name, p in rm.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        emb = rm.model.embed_tokens.weight
        emb[:, 0] = 1.0  # every token: feature 0
        emb[TARGET, 0] = 0.0
        emb[TARGET, 1] = 1.0  # TARGET: feature 1 instead (same norm)
        attn = rm.model.layers[0].self_attn
        attn.v_proj.weight[2, 1] = 1.0
        attn.o_proj.weight[2, 2] = 1.0
        rm.score.weight[0, 2] = 1.0
    rm.save_pretrained(out / "reward")

    g = torch.Generator().manual_seed(args.prompt_seed)
    prompts = []
    for _ in range(args.num_prompts):
        n = int(torch.randint(args.prompt_min, args.prompt_max + 1, (1,), generator=g))
        prompts.append([BOS] + torch.randint(FIRST_PROMPT_TOKEN, V, (n,), generator=g).tolist())

    # sanity: the reward model prefers more TARGET tokens
    with torch.no_grad():
        ids = torch.tensor([[BOS, 7, 8, 9, EOS], [BOS, 7, 8, TARGET, EOS], [BOS, 7, TARGET, TARGET, EOS]])
        h = rm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1]
        s = rm.score(h).squeeze(-1)
    assert s[0] < s[1] < s[2], s

    meta = dict(
        vocab=V, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
        policy_params=sum(p.numel() for p in policy.parameters()), target_token=TARGET, pad=PAD, bos=BOS, eos=EOS,
        model_seed=args.model_seed, prompt_seed=args.prompt_seed, num_prompts=len(prompts),
        reward_sanity=[round(float(x), 4) for x in s],
    )
    (out / "prompts.json").write_text(json.dumps(prompts))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ---------------------------------------------------------------------------
# shared helpers


def _load_common(ckpt: Path, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    kw = dict(attn_implementation=attn, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    policy = AutoModelForCausalLM.from_pretrained(ckpt / "policy", **kw)
    ref = AutoModelForCausalLM.from_pretrained(ckpt / "policy", **kw)
    value = AutoModelForSequenceClassification.from_pretrained(ckpt / "value", **kw)
    reward = AutoModelForSequenceClassification.from_pretrained(ckpt / "reward", **kw)
    reward.eval()
    prompts = json.loads((ckpt / "prompts.json").read_text())
    return tokenizer, policy, ref, value, reward, prompts


def _summary(args, impl: str, step_ends: list[float], t_start: float, scores: list[float], extra: dict) -> dict:
    """step_ends: perf_counter at the end of each step; t_start: just before step 1."""
    import torch

    n_steps = len(step_ends)
    timed_steps = n_steps - 1
    wall = step_ends[-1] - step_ends[0]
    k = min(args.k, len(scores))
    step_s = [step_ends[0] - t_start] + [b - a for a, b in zip(step_ends, step_ends[1:])]
    out = dict(
        impl=impl,
        steps=n_steps,
        episodes=n_steps * args.batch,
        timed_steps=timed_steps,
        timed_episodes=timed_steps * args.batch,
        wall_s=wall,
        episodes_per_s=timed_steps * args.batch / wall if wall > 0 else float("nan"),
        warmup_step_s=step_s[0],
        median_step_s=sorted(step_s[1:])[len(step_s[1:]) // 2] if timed_steps else float("nan"),
        step_s=step_s,
        scores=scores,
        k=k,
        reward_first=sum(scores[:k]) / k,
        reward_last=sum(scores[-k:]) / k,
        settings=dict(
            batch=args.batch, response_length=args.response_length, ppo_epochs=args.ppo_epochs,
            num_minibatches=args.num_minibatches, lr=args.lr, adam_eps=args.adam_eps, temperature=args.temperature,
            kl_coef=args.kl_coef, missing_eos_penalty=args.missing_eos_penalty, seed=args.seed, attn=args.attn,
            threads=torch.get_num_threads(), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
        ),
        versions=_versions(),
        **extra,
    )
    out["reward_gain"] = out["reward_last"] - out["reward_first"]
    return out


def _gc_collect_ms() -> float:
    """Cost of one full gc.collect() in this process after loading (TRL's loop calls it twice per step):
    the second of two back-to-back collections (the first also moves the young objects of the load)."""
    import gc

    gc.collect()
    t = time.perf_counter()
    gc.collect()
    return 1000 * (time.perf_counter() - t)


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "trl"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


# ---------------------------------------------------------------------------
# ours


def run_ours(args) -> dict:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from accelerate import Accelerator

    from pipeline.rl.ppo_trainer import PPOSettings, PPOTrainer
    from pipeline.rl.rollout import reward_model_scores

    t_load = time.perf_counter()
    tokenizer, policy, ref, value, reward, prompts = _load_common(Path(args.checkpoint), args.attn)
    settings = PPOSettings(
        temperature=args.temperature, max_new_tokens=args.response_length, top_k=None, ppo_epochs=args.ppo_epochs,
        num_minibatches=args.num_minibatches, kl_coef=args.kl_coef, missing_eos_penalty=args.missing_eos_penalty,
        max_grad_norm=None,  # TRL 1.12's PPO loop does not clip gradients
    )
    # TRL: one AdamW (fused, the transformers default on torch >= 2.8) over policy + value; per-parameter
    # Adam makes two optimizers over the same parameters the same update
    opt = dict(lr=args.lr, eps=args.adam_eps, weight_decay=0.0, fused=True)
    trainer = PPOTrainer(
        policy, ref, value, lambda ids, mask: reward_model_scores(reward, ids, mask), tokenizer, settings,
        Accelerator(cpu=True), torch.optim.AdamW(policy.parameters(), **opt), torch.optim.AdamW(value.parameters(), **opt),
        seed=args.seed,
    )
    load_s = time.perf_counter() - t_load
    gc_ms = _gc_collect_ms()

    # prompts: a fresh shuffle per pass over the prompt set, full batches only (like TRL's dataloader)
    g = torch.Generator().manual_seed(args.seed)

    def batches():
        while True:
            perm = torch.randperm(len(prompts), generator=g).tolist()
            for i in range(0, len(perm) - args.batch + 1, args.batch):
                yield [prompts[j] for j in perm[i : i + args.batch]]

    it = batches()
    n_steps = -(-args.episodes // args.batch)
    scores, step_ends, metrics = [], [], []
    t_start = time.perf_counter()
    for _ in range(n_steps):
        m = trainer.step(next(it))
        step_ends.append(time.perf_counter())
        scores.append(m["reward/normalised"])  # reward_mean 0 / std 1: raw score minus any missing-EOS penalty
        metrics.append({k: m[k] for k in ("reward/raw", "kl", "entropy", "response_length", "eos_rate")})
    return _summary(args, "ours", step_ends, t_start, scores, dict(load_s=load_s, gc_collect_ms=gc_ms, metrics=metrics))


# ---------------------------------------------------------------------------
# TRL 1.12


def run_trl(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if args.trl_skip_gc:  # sensitivity run only: TRL's loop as shipped calls gc.collect() twice per step
        import types

        import trl.experimental.ppo.ppo_trainer as trl_ppo

        trl_ppo.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)

    t_load = time.perf_counter()
    tokenizer, policy, ref, value, reward, prompts = _load_common(Path(args.checkpoint), args.attn)
    train = Dataset.from_dict({"input_ids": prompts})
    evald = Dataset.from_dict({"input_ids": prompts[: args.batch]})
    outdir = tempfile.mkdtemp(prefix="trl_ppo_bench_")
    config = PPOConfig(
        output_dir=outdir,
        total_episodes=args.episodes,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=args.batch,
        num_ppo_epochs=args.ppo_epochs,
        num_mini_batches=args.num_minibatches,
        response_length=args.response_length,
        temperature=args.temperature,
        stop_token_id=EOS,
        missing_eos_penalty=args.missing_eos_penalty,
        kl_coef=args.kl_coef,
        kl_estimator="k1",
        learning_rate=args.lr,
        adam_epsilon=args.adam_eps,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        num_sample_generations=0,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=args.seed,
    )

    class Recorder(TrainerCallback):
        def __init__(self):
            self.step_ends, self.scores, self.metrics = [], [], []

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                self.scores.append(float(logs["objective/scores"]))
                self.metrics.append({k: logs.get(k) for k in ("objective/kl", "objective/entropy", "val/num_eos_tokens")})

        def on_step_end(self, args_, state, control, **kw):
            self.step_ends.append(time.perf_counter())

    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
        value_model=value, train_dataset=train, eval_dataset=evald,
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    rec = Recorder()
    trainer.add_callback(rec)
    load_s = time.perf_counter() - t_load
    gc_ms = _gc_collect_ms()
    optimizer = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer)
    opt_defaults = getattr(trainer.optimizer, "defaults", {})

    t_start = time.perf_counter()
    trainer.train()
    assert len(rec.step_ends) == len(rec.scores), (len(rec.step_ends), len(rec.scores))
    return _summary(
        args, "trl", rec.step_ends, t_start, rec.scores,
        dict(
            load_s=load_s, gc_collect_ms=gc_ms, metrics=rec.metrics,
            optimizer=f"{optimizer.__name__} fused={opt_defaults.get('fused')} eps={opt_defaults.get('eps')}",
            trl_config=dict(
                bf16=config.bf16, gradient_checkpointing=config.gradient_checkpointing,
                policy_checkpointing=bool(getattr(policy, "is_gradient_checkpointing", False)),
                lr_scheduler=str(getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)),
                device=str(trainer.accelerator.device), num_total_batches=config.num_total_batches,
                skip_gc=bool(args.trl_skip_gc),
            ),
        ),
    )


# ---------------------------------------------------------------------------
# driver


def _table(results: list[dict]) -> str:
    ours = [r for r in results if r["impl"] == "ours"]
    trl = [r for r in results if r["impl"] == "trl"]
    trl_eps = sum(r["episodes_per_s"] for r in trl) / len(trl) if trl else None
    lines = [
        "| impl | seed | episodes (timed) | wall s (timed) | episodes/s | median step ms | warm-up step ms | one gc.collect ms | reward first k | reward last k | gain | speedup vs TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speed = f"{r['episodes_per_s'] / trl_eps:.1f}x" if trl_eps else "-"
        name = r["impl"] + (" (gc.collect off)" if r.get("trl_config", {}).get("skip_gc") else "")
        lines.append(
            f"| {name} | {r['settings']['seed']} | {r['episodes']} ({r['timed_episodes']}) | {r['wall_s']:.2f} | "
            f"{r['episodes_per_s']:.1f} | {1000 * r['median_step_s']:.1f} | {1000 * r['warmup_step_s']:.0f} | "
            f"{r['gc_collect_ms']:.0f} | {r['reward_first']:.3f} | {r['reward_last']:.3f} | {r['reward_gain']:+.3f} | {speed} |"
        )
    if ours and trl:
        mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        lines.append(
            f"| **mean ours/trl** | {len(ours)}/{len(trl)} seeds | | | {mean(ours, 'episodes_per_s'):.1f} / {mean(trl, 'episodes_per_s'):.1f} | "
            f"| | | | | {mean(ours, 'reward_gain'):+.3f} / {mean(trl, 'reward_gain'):+.3f} | "
            f"**{mean(ours, 'episodes_per_s') / mean(trl, 'episodes_per_s'):.1f}x** |"
        )
    s = results[0]["settings"]
    lines.append(
        f"\nk = {results[0]['k']} steps; batch {s['batch']}, response length {s['response_length']}, PPO epochs {s['ppo_epochs']}, "
        f"minibatches {s['num_minibatches']}, lr {s['lr']}, temperature {s['temperature']}, kl_coef {s['kl_coef']}, "
        f"missing_eos_penalty {s['missing_eos_penalty']}, attn {s['attn']}, torch threads {s['threads']}, OMP_NUM_THREADS {s['OMP_NUM_THREADS']}"
    )
    return "\n".join(lines)


def _forward_args(args) -> list[str]:
    out = []
    for key in ("episodes", "batch", "response_length", "ppo_epochs", "num_minibatches", "lr", "adam_eps", "temperature",
                "kl_coef", "attn", "k"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.missing_eos_penalty is not None:
        out += ["--missing-eos-penalty", str(args.missing_eos_penalty)]
    if args.trl_skip_gc:
        out += ["--trl-skip-gc"]
    return out


def compare(args) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ppo_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else work / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = str(Path(__file__).resolve())
    if not (ckpt / "meta.json").exists():
        subprocess.run([sys.executable, script, "--make-checkpoint", str(ckpt), *_model_args(args)], check=True, env=env)
    print("checkpoint:", (ckpt / "meta.json").read_text().replace("\n", ""), flush=True)
    impls = [i for i in args.impls.split(",") if i]
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for impl in impls:
            py = args.trl_python if impl == "trl" else sys.executable
            out = work / f"{impl}_seed{seed}.json"
            cmd = [py, script, "--impl", impl, "--checkpoint", str(ckpt), "--seed", str(seed), "--out", str(out), *_forward_args(args)]
            print("+", " ".join(cmd), flush=True)
            if args.quiet:
                with open(work / f"{impl}_seed{seed}.log", "w") as log:
                    proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                if proc.returncode:
                    sys.exit(f"{impl} failed (exit {proc.returncode}); see {work}/{impl}_seed{seed}.log")
            else:
                subprocess.run(cmd, check=True, env=env)
            results.append(json.loads(out.read_text()))
    table = _table(results)
    print()
    print(table)
    (work / "table.md").write_text(table + "\n")
    print(f"\nresults: {work}/*.json, table: {work}/table.md")


def _model_args(args) -> list[str]:
    out = []
    for key in ("vocab", "hidden", "intermediate", "layers", "heads", "num_prompts", "prompt_min", "prompt_max", "model_seed", "prompt_seed"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make-checkpoint", metavar="DIR", help="build the tiny models, tokenizer and prompts in DIR")
    mode.add_argument("--impl", choices=["ours", "trl"], help="run one trainer (trl: under the TRL 1.12 venv's python)")
    mode.add_argument("--compare", action="store_true", help="checkpoint (if needed), then each impl per seed, then a table")
    p.add_argument("--checkpoint", help="folder made by --make-checkpoint (--compare: made in --workdir if omitted)")
    p.add_argument("--out", help="--impl: write the result JSON here")
    p.add_argument("--trl-python", default="/tmp/trl112/bin/python", help="--compare: python of the TRL 1.12 venv")
    p.add_argument("--workdir", help="--compare: folder for the checkpoint and result JSONs (default: a temp folder)")
    p.add_argument("--impls", default="ours,trl", help="--compare: comma-separated, run in this order")
    p.add_argument("--seeds", default="0", help="--compare: comma-separated seeds, each impl runs once per seed")
    p.add_argument("--quiet", action="store_true", help="--compare: runs' own output to WORKDIR/IMPL_seedN.log")
    # training settings (identical on both sides)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--response-length", type=int, default=16)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--num-minibatches", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--adam-eps", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--missing-eos-penalty", type=float, default=None)
    p.add_argument("--attn", default="sdpa", help="attn_implementation for every model on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-skip-gc", action="store_true",
                   help="TRL only, sensitivity run: make TRL's per-step gc.collect() calls no-ops (not TRL as shipped)")
    p.add_argument("--k", type=int, default=3, help="reward first/last: mean over this many steps")
    # model settings (--make-checkpoint)
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=224)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-min", type=int, default=2, help="prompt length (after BOS), min")
    p.add_argument("--prompt-max", type=int, default=6, help="prompt length (after BOS), max")
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--prompt-seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.make_checkpoint:
        print(json.dumps(make_checkpoint(Path(args.make_checkpoint), args)))
        return
    if args.compare:
        compare(args)
        return
    if not args.checkpoint:
        p.error("--impl needs --checkpoint")
    result = (run_ours if args.impl == "ours" else run_trl)(args)
    brief = {k: result[k] for k in ("impl", "episodes", "timed_episodes", "wall_s", "episodes_per_s", "reward_first", "reward_last")}
    print(json.dumps(brief))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
