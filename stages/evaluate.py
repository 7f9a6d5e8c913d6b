"""Evaluation stage: what each checkpoint of the run is worth, measured the same way every time.

    python -m stages.evaluate recipes/tiny.yaml

* bits per byte of every causal checkpoint (pretrain, sft, ppo) on the packed validation blocks, and
  of a unigram model of the training blocks (the baseline a language model must beat);
* the judge (pipeline/task/instructions.py, the programmatic annotator) on SFT and PPO answers to
  held-out prompts: mean score, pass rate, per-constraint pass rates; PPO-vs-SFT win rate under the
  judge and under the reward model; the reward model's held-out scores, and how often it orders
  two answers as the judge does (split: a constraint differs / only the copied content differs);
* KL(PPO || SFT) on PPO's own samples (sum over response tokens, mean over prompts);
* a contamination check: word n-gram overlap of the evaluation prompts with every training source;
* sample generations side by side.
Output `results/`: `metrics.json` and `samples.jsonl`. Every input but `prompts` is optional.
"""

from __future__ import annotations

import json
import logging
import math

import torch

from pipeline.data import chat as chat_data
from pipeline.data.contamination import contamination_report
from pipeline.data.packing import collate_blocks, token_byte_lengths
from pipeline.data.sources import load_dataset_input, model_path, require_columns, require_same_tokenizer
from pipeline.recipe.stages import EvaluateSettings
from pipeline.rl.ppo_core import masked_mean
from pipeline.rl.rollout import batched_logprobs, generate_answers, generate_responses, left_pad, reward_model_scores
from pipeline.runner.stage import StageContext, stage_main
from pipeline.task.instructions import grade, is_task_prompt, judge, score_responses
from pipeline.train.distributed import make_accelerator
from pipeline.train.loop import make_lm_evaluator

log = logging.getLogger("pipeline")
CAUSAL = ("pretrain", "sft", "ppo")
BPB_BLOCKS_PER_BATCH = 8


def load_causal(ctx: StageContext, name: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path(ctx.inputs[name]), dtype=torch.float32)
    return model.eval()


def answer(model, tokenizer, prompts: list[str], s, seed: int) -> list[str]:
    """Batched answers (greedy, or sampled at s.temperature with a fixed seed)."""

    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": s.temperature} if s.temperature > 0 else {"do_sample": False}
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                               **sampling)
    return [a[0] for a in answers]


@torch.no_grad()
def reward_scores(reward_model, tokenizer, prompts: list[str], responses: list[str], max_length: int = 512) -> list[float]:
    out: list[float] = []
    for i in range(0, len(prompts), 32):
        seqs = [chat_data.encode_scored(tokenizer, p, r, max_length) for p, r in zip(prompts[i:i + 32], responses[i:i + 32])]
        ids, mask = left_pad(seqs, chat_data.pad_id(tokenizer))
        out += reward_model_scores(reward_model, ids, mask).tolist()
    return out


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, prompts: list[str], s, seed: int) -> float:
    """Monte-Carlo KL(policy || reference) per response, on the policy's own samples at kl_temperature."""

    gen = torch.Generator().manual_seed(seed)
    totals = []
    for i in range(0, len(prompts), s.batch_size):
        query, query_mask = left_pad([chat_data.prompt_ids(tokenizer, p) for p in prompts[i:i + s.batch_size]],
                                     chat_data.pad_id(tokenizer))
        roll = generate_responses(policy, query, query_mask, max_new_tokens=s.max_new_tokens,
                                  temperature=s.kl_temperature, eos_token_id=chat_data.stop_token_ids(tokenizer),
                                  pad_token_id=chat_data.pad_id(tokenizer), generator=gen)
        start = query.shape[1]
        lp = batched_logprobs(policy, roll.input_ids, roll.attention_mask, start, s.kl_temperature)
        ref = batched_logprobs(reference, roll.input_ids, roll.attention_mask, start, s.kl_temperature)
        totals.append(((lp - ref) * roll.response_mask).sum(-1))
    per_response = torch.cat(totals)
    return float(masked_mean(per_response, torch.ones_like(per_response)))


def bits_per_byte(models: dict, ctx: StageContext) -> dict[str, float]:
    """Validation bits per byte of each causal checkpoint, and of the unigram baseline (same blocks, same bytes)."""
    import datasets
    from transformers import AutoTokenizer

    data = datasets.load_from_disk(str(ctx.inputs["data"].path))
    validation = data["validation"].with_format("numpy")
    accelerator = make_accelerator(1, None)
    out = {}
    for name, model in models.items():
        lengths = token_byte_lengths(AutoTokenizer.from_pretrained(model_path(ctx.inputs[name])))
        evaluate = make_lm_evaluator(accelerator, validation, collate_blocks, BPB_BLOCKS_PER_BATCH,
                                     ctx.settings.bpb_batches, lengths)
        out[name] = evaluate(model)["val_bpb"]
    out["unigram_baseline"] = unigram_bits_per_byte(data, lengths, BPB_BLOCKS_PER_BATCH * ctx.settings.bpb_batches)
    return out


def unigram_bits_per_byte(data, byte_lengths: torch.Tensor, n_blocks: int) -> float:
    """The floor any language model must beat: token frequencies of the training blocks (add-one
    smoothed) scored on the first n_blocks validation blocks, with the byte accounting of
    pipeline.train.loop.make_lm_evaluator (targets of 0 bytes, BOS/EOS, left out)."""
    import numpy as np

    vocab = len(byte_lengths)
    counts = np.ones(vocab, dtype=np.float64)
    for batch in data["train"].with_format("numpy").iter(batch_size=1024):
        counts += np.bincount(np.asarray(batch["input_ids"])[:, 1:].reshape(-1), minlength=vocab)[:vocab]
    log_p = np.log(counts / counts.sum())
    n = min(len(data["validation"]), n_blocks)
    targets = np.asarray(data["validation"].with_format("numpy")[:n]["input_ids"])[:, 1:].reshape(-1)
    nbytes = byte_lengths.numpy()[targets]
    return float(-(log_p[targets] * (nbytes > 0)).sum() / math.log(2) / max(1, nbytes.sum()))


def reward_judge_agreement(rows: list[dict], a: list[str], b: list[str], rm_a: list[float], rm_b: list[float],
                           min_gap: float = 0.1) -> dict:
    """How often the reward model orders two answers to one prompt as the judge does (pairs whose judge
    scores differ by more than min_gap), split by what differs: a constraint, or only faithfulness
    (content copied wrong). A reward model blind to one kind lets PPO drift there unpenalised."""

    counts = {"constraints_differ": [0, 0], "faithfulness_only": [0, 0]}
    for row, x, y, rx, ry in zip(rows, a, b, rm_a, rm_b):
        gx, gy = grade(row, x), grade(row, y)
        if abs(gx.score - gy.score) <= min_gap:
            continue
        kind = "constraints_differ" if gx.satisfied != gy.satisfied else "faithfulness_only"
        counts[kind][0] += 1
        counts[kind][1] += (gx.score > gy.score) == (rx > ry)
    n = sum(c[0] for c in counts.values())
    out: dict = {"pairs": n, "accuracy": sum(c[1] for c in counts.values()) / n if n else None}
    for kind, (k, ok) in counts.items():
        out[f"pairs/{kind}"] = k
        out[f"accuracy/{kind}"] = ok / k if k else None
    return out


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a beats b, ties counting half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / max(1, len(a))


def contamination(ctx: StageContext, rows: list[dict], prompt_data) -> dict:
    """Overlap of the held-out content (the `source` sentence when the prompts have one) with training text."""

    column = "source" if "source" in prompt_data["train"].column_names else "prompt"
    sources = {"ppo_prompts": [chat_data.prompt_text(p) for p in prompt_data["train"]["prompt"]]}
    if "corpus" in ctx.inputs:
        sources["pretraining_corpus"] = list(load_dataset_input(ctx.inputs["corpus"], seed=ctx.seed)["train"]["text"])
    if "sft_data" in ctx.inputs:
        part = load_dataset_input(ctx.inputs["sft_data"], seed=ctx.seed)["train"]
        sources["sft_data"] = [m["content"] for row in part["messages"] for m in row] if "messages" in part.column_names \
            else [" ".join(map(str, row.values())) for row in part]
    if "preferences" in ctx.inputs:
        part = load_dataset_input(ctx.inputs["preferences"], seed=ctx.seed)["train"]
        sources["preferences"] = [chat_data.prompt_text(p) for p in part["prompt"]]
    report = contamination_report([chat_data.prompt_text(r[column]) for r in rows], sources, ctx.settings.ngram)
    report["checked_column"] = column
    return report


def run(ctx: StageContext[EvaluateSettings]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    s = ctx.settings
    prompt_data = load_dataset_input(ctx.inputs["prompts"], seed=ctx.seed, columns=s.columns)
    require_columns(prompt_data, ["prompt"], ctx.inputs["prompts"])
    held_out = prompt_data["validation"].select(range(min(s.n_prompts, len(prompt_data["validation"]))))
    rows = [dict(r) for r in held_out]
    prompts = [r["prompt"] for r in rows]
    results: dict = {"n_prompts": len(prompts)}

    if "sft" in ctx.inputs:  # answers are compared and scored across these models
        require_same_tokenizer(ctx.inputs, ["ppo", "reward"], "sft")
    models = {name: load_causal(ctx, name) for name in CAUSAL if name in ctx.inputs}
    if "data" in ctx.inputs and models:
        results["bits_per_byte"] = bits_per_byte(models, ctx)
        results["bits_per_byte_unigram_baseline"] = results["bits_per_byte"].pop("unigram_baseline")

    # the task's judge grades only the task's prompts; on anyone's prompts the reward model, KL, lengths
    # and samples are what there is
    judged_task = all(is_task_prompt(r) for r in rows)
    results["judge"] = "task" if judged_task else None
    answers: dict[str, list[str]] = {}
    judged: dict[str, list[float]] = {}
    for name in ("sft", "ppo"):
        if name not in models:
            continue
        tokenizer = AutoTokenizer.from_pretrained(model_path(ctx.inputs[name]))
        answers[name] = answer(models[name], tokenizer, prompts, s, ctx.seed)
        results[f"response_words_{name}"] = sum(len(a.split()) for a in answers[name]) / max(1, len(prompts))
        if judged_task:
            judged[name] = [judge(r, a) for r, a in zip(rows, answers[name])]
            results[f"judge_{name}"] = score_responses(rows, answers[name])
            log.info("%s: judge mean %.3f, pass rate %.3f", name, results[f"judge_{name}"]["mean_score"],
                     results[f"judge_{name}"]["pass_rate"])

    if "reward" in ctx.inputs:
        path = model_path(ctx.inputs["reward"])
        reward_model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        rm = {name: reward_scores(reward_model, tokenizer, prompts, a) for name, a in answers.items()}
        results["reward_model_mean"] = {name: sum(v) / len(v) for name, v in rm.items()}
        if {"sft", "ppo"} <= set(rm):
            results["win_rate_ppo_vs_sft_reward_model"] = win_rate(rm["ppo"], rm["sft"])
            if judged_task:
                results["reward_model_vs_judge"] = reward_judge_agreement(rows, answers["ppo"], answers["sft"],
                                                                          rm["ppo"], rm["sft"])
    if {"sft", "ppo"} <= set(judged):
        results["win_rate_ppo_vs_sft_judge"] = win_rate(judged["ppo"], judged["sft"])
    if {"sft", "ppo"} <= set(models):
        tokenizer = AutoTokenizer.from_pretrained(model_path(ctx.inputs["ppo"]))
        results["kl_ppo_to_sft"] = kl_to_reference(models["ppo"], models["sft"], tokenizer, prompts, s, ctx.seed)

    results["contamination"] = contamination(ctx, rows, prompt_data)
    out = ctx.output_dir("results")
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    with open(out / "samples.jsonl", "w") as f:
        for i, row in enumerate(rows[:s.n_samples]):
            f.write(json.dumps({"prompt": row["prompt"], **{name: {"response": a[i], **({"judge": judged[name][i]}
                                                                                        if name in judged else {})}
                                                           for name, a in answers.items()}}) + "\n")
    ctx.metrics.update({k: v for k, v in results.items() if k != "contamination"},
                       contamination_flagged={k: v["flagged_fraction"] for k, v in results["contamination"]["sources"].items()})


if __name__ == "__main__":
    stage_main("evaluate", run)
