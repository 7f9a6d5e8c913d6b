"""Pretraining benchmark on Tiny Shakespeare against nanoGPT (issue 4; results in docs/benchmarks.md, "Pretraining").

    python benchmarks/bench_pretrain.py benchmarks/shakespeare_fast.yaml            # targets a and b
    python benchmarks/bench_pretrain.py benchmarks/shakespeare_nanogpt_shape.yaml   # target c
    python benchmarks/bench_pretrain.py RECIPE [--threads 1] [--run-dir DIR] [KEY=VALUE ...]

What it does:

1. Writes nanoGPT's split of `../shared/data/tinyshakespeare.txt` (first 90% of the characters train,
   last 10% validation) as a saved `datasets` folder (benchmarks/shakespeare_split.py). This is the
   input file, like nanoGPT's data/shakespeare_char/prepare.py; it is done before the clock starts
   (about 1 s) and reported separately.
2. Starts the clock, then runs the whole path through the real CLI in a fresh run dir:
   `python -m pipeline run RECIPE run_dir=DIR stages.tokenizer.inputs.corpus=SPLIT
   stages.prepare.inputs.corpus=SPLIT [KEY=VALUE ...]`: tokenizer training, tokenization and packing,
   pretraining with periodic validation, model export, the run report; every process start included.
3. Reads the pretrain stage's `metrics.jsonl` (one row per evaluation: `elapsed_s` since the pipeline
   run started, `val_bpb` on the validation 10%, `tokens`) and manifest, and prints: time to reach
   2.70 bits per byte (the first evaluation at or below it), the best bits per byte evaluated within
   80 s, the final bits per byte, and training tokens/s. A JSON summary goes to DIR/bench.json.

Times are from before the `python -m pipeline` process starts. `elapsed_s` in metrics.jsonl counts from
the runner's own start time; the offset between the two is taken as the moment the runner's first line
(printed just after it plans, before the first stage starts) reaches this script, so it over- rather
than under-counts. An evaluation's time includes the evaluation itself.

Validation bits per byte is tokenizer independent: the summed cross-entropy (nats) of every
validation target that stands for text, / ln 2, / the UTF-8 bytes of those targets
(pipeline.train.loop.make_lm_evaluator; BOS/EOS count 0 bytes and are left out). The text is ASCII,
so nanoGPT's nats per character / ln 2 is the same unit.

Environment: `HF_DATASETS_IN_MEMORY_MAX_SIZE` is set so that `datasets` keeps the 1 MB split in memory;
without it the prepare stage's `map` writes `cache-*.arrow` files into the input folder, which changes
the folder's fingerprint between the runner's plan and the pretrain stage's check, and pretrain then
refuses to start ("the outputs of stage 'prepare' are stale"). `--threads N` sets OMP_NUM_THREADS
(default: the pipeline's own choice, all cores for a single process); on a machine shared with other
jobs 1 thread is much faster than 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from shakespeare_split import DEFAULT_TEXT, write_split  # noqa: E402

NANOGPT = {  # nanoGPT, README "baby GPT" on Shakespeare characters
    "cpu_val_loss_nats": 1.874,   # 4 layers x 4 heads x 128, block 64, batch 12, 2000 iters, ~80 s on this class
    "cpu_seconds": 80.0,
    "cpu_tokens_per_s": 2000 * 12 * 64 / 80.0,  # 19.2k
    "gpu_val_loss_nats": 1.4697,  # 6 x 6 x 384, block 256, 5000 iters, ~3 min on an A100
}
TARGET_BPB = round(NANOGPT["cpu_val_loss_nats"] / math.log(2), 2)  # 2.70
TARGET_SECONDS_A = NANOGPT["cpu_seconds"] / 4  # 20 s
TARGET_BPB_B = 2.10
BUDGET_B = NANOGPT["cpu_seconds"]  # 80 s


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_pipeline(recipe: Path, run_dir: Path, split: Path, overrides: list[str], threads: int | None,
                 quiet: bool) -> dict:
    """Run the recipe through the CLI; returns wall times seen from here."""
    env = dict(os.environ)
    env.setdefault("HF_DATASETS_IN_MEMORY_MAX_SIZE", str(1 << 30))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "pipeline", "run", str(recipe), f"run_dir={run_dir}",
           f"stages.tokenizer.inputs.corpus={split}", f"stages.prepare.inputs.corpus={split}", *overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_line_s = None
    stage_walls: dict[str, float] = {}
    tail: list[str] = []
    buf = b""
    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read1(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
        now = time.time() - t0
        for raw in lines:
            line = raw.decode(errors="replace")
            if not line.strip():
                continue
            if line.startswith("[pipeline]") and first_line_s is None:
                first_line_s = now
            if line.startswith("[pipeline]") and ": done in " in line:
                name = line.split()[1].rstrip(":")
                stage_walls[name] = float(line.rsplit("done in", 1)[1].split()[0])
            tail = (tail + [line])[-40:]
            progress = "it/s]" in line or "s/it]" in line or "examples/s]" in line or "%|" in line
            if not quiet or (line.startswith("[") and not progress) or line.startswith("error"):
                print(f"{now:7.1f}s | {line}", flush=True)
    code = proc.wait()
    wall = time.time() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every process of the run (all were waited for)
    if code != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"pipeline run failed with exit code {code}")
    return {"wall_s": wall, "runner_start_offset_s": first_line_s or 0.0, "stage_walls_s": stage_walls,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def summarize(run_dir: Path, seen: dict) -> dict:
    offset = seen["runner_start_offset_s"]
    metrics = read_jsonl(run_dir / "pretrain" / "metrics.jsonl")
    if not metrics:
        raise SystemExit(f"no evaluations in {run_dir / 'pretrain' / 'metrics.jsonl'}")
    manifests = {}
    for name in ("tokenizer", "prepare", "pretrain"):
        path = run_dir / name / "manifest.json"
        manifests[name] = json.loads(path.read_text()) if path.exists() else {}
    pre = manifests["pretrain"].get("metrics", {})
    evals = [{**m, "t_s": round(offset + m["elapsed_s"], 2)} for m in metrics]
    reach = next((e for e in evals if e["val_bpb"] <= TARGET_BPB), None)
    within = [e for e in evals if e["t_s"] <= BUDGET_B]
    best_b = min(within, key=lambda e: e["val_bpb"]) if within else None
    stages = {}
    for name, m in manifests.items():
        inside = m.get("duration_s")
        wall = seen["stage_walls_s"].get(name)
        stages[name] = {"wall_s": wall, "in_process_s": inside,
                        "process_overhead_s": round(wall - inside, 2) if wall is not None and inside is not None else None}
    settings = manifests["pretrain"].get("settings", {})
    model = manifests["pretrain"].get("model", {})
    return {
        "run_dir": str(run_dir),
        "total_wall_s": round(seen["wall_s"], 2),
        "total_cpu_s": round(seen["cpu_s"], 2),
        "runner_start_offset_s": round(offset, 2),
        "stages": stages,
        "tokenizer": manifests["tokenizer"].get("metrics", {}),
        "prepare": manifests["prepare"].get("metrics", {}),
        "pretrain": {k: pre.get(k) for k in ("steps", "tokens", "train_seconds", "tokens_per_s", "parameters",
                                              "block_size", "final_val_loss", "final_val_bpb")},
        "micro_batch_size": settings.get("micro_batch_size"),
        "model": model,
        "evals": evals,
        "time_to_target_s": reach["t_s"] if reach else None,
        "target_bpb": TARGET_BPB,
        "best_bpb_within_80s": best_b["val_bpb"] if best_b else None,
        "best_bpb_within_80s_at_s": best_b["t_s"] if best_b else None,
        "final_bpb": evals[-1]["val_bpb"],
        "final_at_s": evals[-1]["t_s"],
    }


def report(s: dict, load_before: str, load_after: str) -> str:
    def fmt(x, spec=".3f"):
        return "—" if x is None else format(x, spec)

    tps = s["pretrain"]["tokens_per_s"]
    lines = [
        f"run {s['run_dir']}",
        f"load average before {load_before}, after {load_after}",
        f"total wall (first process start to exit): {s['total_wall_s']:.1f} s "
        f"(runner up after {s['runner_start_offset_s']:.1f} s); CPU time of all its processes {s['total_cpu_s']:.1f} s",
    ]
    for name, st in s["stages"].items():
        lines.append(f"  {name:<10} wall {fmt(st['wall_s'], '.1f')} s, in-process {fmt(st['in_process_s'], '.1f')} s, "
                     f"process start/exit {fmt(st['process_overhead_s'], '.1f')} s")
    lines.append("evaluations (t from first process start):")
    for e in s["evals"]:
        lines.append(f"  step {e['step']:>5}  tokens {e['tokens']:>9,}  t {e['t_s']:7.1f} s  "
                     f"val_loss {e['val_loss']:.4f}  val_bpb {e['val_bpb']:.4f}")
    a = s["time_to_target_s"]
    lines += [
        f"(a) time to {TARGET_BPB} bpb: {fmt(a, '.1f')} s  (target <= {TARGET_SECONDS_A:.0f} s: "
        f"{'met' if a is not None and a <= TARGET_SECONDS_A else 'missed'})",
        f"(b) best bpb within {BUDGET_B:.0f} s: {fmt(s['best_bpb_within_80s'], '.4f')} at "
        f"{fmt(s['best_bpb_within_80s_at_s'], '.1f')} s  (target <= {TARGET_BPB_B}: "
        f"{'met' if s['best_bpb_within_80s'] is not None and s['best_bpb_within_80s'] <= TARGET_BPB_B else 'missed'})",
        f"final bpb: {s['final_bpb']:.4f} at {s['final_at_s']:.1f} s",
        f"training tokens/s (pretrain loop incl. its evals/checkpoints): {fmt(tps, ',.0f')}  (nanoGPT CPU "
        f"~{NANOGPT['cpu_tokens_per_s']:,.0f}; target c compares steps at nanoGPT's shape: --reference-step)",
    ]
    return "\n".join(lines)


def reference_step_speed(threads: int | None, steps: int = 30) -> dict:
    """Training tokens/s, measured under the current load, of a nanoGPT model at its CPU shape (GPT:
    LayerNorm, GELU MLP 4x, learned positions, tied head; block 64, batch 12) and of our model at the
    same shape (pipeline.train.models: Llama), each with nanoGPT's 65-character and our 1024-token
    vocabulary, AdamW as each ships it on CPU (nanoGPT: torch's default loop; ours: the training loop's
    fused kernel), the same thread count, eager and under torch.compile (nanoGPT's CPU recipe runs
    eager; ours compiles with the recipe key `compile: true`). Compares step speed on one machine at
    one moment (target c), separates the vocabulary's cost from the architecture's, and reports
    training FLOPs per token (6 x matmul parameters + attention, PaLM's count) so the achieved FLOP/s
    of the two can be compared.

    Each side runs in a process of its own, set up as it ships: ours with the heap setting every CPU
    stage applies (pipeline.train.distributed.keep_freed_memory), nanoGPT's with the default allocator. The
    two processes take turns (one variant timed at a time, interleaved over 5 rounds, medians), so a
    load change mid-run hits every variant alike."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers = {}
    for side in ("nanogpt", "ours"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_step_timer, args=(side, threads, steps, child), daemon=True)
        proc.start()
        workers[side] = (proc, parent)
    flops: dict[str, float] = {}
    names: dict[str, str] = {}  # variant -> side
    used_threads = None
    for side, (_, conn) in workers.items():
        info = conn.recv()  # after the worker built (and compiled) its variants
        flops.update(info["flops"])
        names.update({name: side for name in info["variants"]})
        used_threads = info["threads"]
    out = {"threads": used_threads, "load_before": load_average()}
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(5):
        for name, side in names.items():
            conn = workers[side][1]
            conn.send(name)
            rounds[name].append(conn.recv())
    for proc, conn in workers.values():
        conn.send(None)
        proc.join()
    for name, values in rounds.items():
        out[f"{name}_tokens_per_s"] = round(sorted(values)[2])
    base = out["nanogpt_v65_tokens_per_s"]
    out["over_nanogpt_v65"] = {name: round(out[f"{name}_tokens_per_s"] / base, 2) for name in names}
    out["flops_per_token"] = {name: round(f) for name, f in flops.items()}
    out["flop_ratio_vs_nanogpt_v65"] = {name: round(flops["nanogpt_v65"] / f, 2) for name, f in flops.items()}
    out["achieved_gflops"] = {name: round(out[f"{name}_tokens_per_s"] * flops[name.removesuffix("_compiled")] / 1e9, 1)
                              for name in names}
    out["load_after"] = load_average()
    return out


def _step_timer(side: str, threads: int | None, steps: int, conn) -> None:
    """Worker of reference_step_speed: builds one side's variants, then times the one asked for."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from pipeline.recipe.settings import ModelSettings, TrainSettings
    from pipeline.train import distributed, models
    from pipeline.train import loop as training

    if threads:
        torch.set_num_threads(threads)
    if side == "ours":
        distributed.keep_freed_memory()  # as make_accelerator does in every CPU stage
    B, T, L, D, H = 12, 64, 4, 128, 4
    FFN = 344  # SwiGLU width with nanoGPT's MLP parameters and FLOPs (3 x 128 x 344 ~ 2 x 128 x 512)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

        def forward(self, x):
            q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(D, 2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
            x = x + self.proj(y)
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, D), nn.Embedding(T, D)
            self.blocks, self.ln = nn.ModuleList(Block() for _ in range(L)), nn.LayerNorm(D)
            self.head = nn.Linear(D, vocab, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(T))
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln(x))

    flops: dict[str, float] = {}

    def nanogpt(vocab, compile=False):
        model = GPT(vocab)
        matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n != "wpe.weight")
        flops[f"nanogpt_v{vocab}"] = 6 * matmul_params + 12 * L * D * T
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # nanoGPT fuses AdamW on CUDA only
        forward = torch.compile(model) if compile else model
        x = torch.randint(0, vocab, (B, T + 1))

        def step():
            loss = F.cross_entropy(forward(x[:, :-1]).reshape(-1, vocab), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def ours(vocab, compile=False):
        settings = ModelSettings(size="tiny", n_layers=L, d_model=D, n_heads=H, n_kv_heads=H, ffn_dim=FFN, max_seq_len=T)
        model = models.build_model(settings, vocab, 0, 1, 2)
        flops[f"ours_v{vocab}"] = models.flops_per_token(model.config, T)
        opt = training.build_optimizer(model, TrainSettings(learning_rate=1e-3), fused=True)  # as the stage does
        forward = torch.compile(model) if compile else model  # what training.train does for `compile: true`
        batch = {"input_ids": torch.randint(3, vocab, (B, T + 1)), "position_ids": torch.arange(T + 1).repeat(B, 1)}

        def step():
            loss, _ = models.causal_lm_loss(forward, batch, settings)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    # nanoGPT as its CPU recipe runs it (eager) and compiled, and at our 1024 vocabulary; ours at the
    # smallest byte-level BPE (300, about nanoGPT's characters per token) and at 1024, eager and compiled
    variants = ({"nanogpt_v65": lambda: nanogpt(65), "nanogpt_v65_compiled": lambda: nanogpt(65, True),
                 "nanogpt_v1024": lambda: nanogpt(1024)} if side == "nanogpt" else
                {"ours_v300": lambda: ours(300), "ours_v300_compiled": lambda: ours(300, True),
                 "ours_v1024": lambda: ours(1024), "ours_v1024_compiled": lambda: ours(1024, True)})
    made = {name: make() for name, make in variants.items()}
    for step in made.values():  # warm up (and compile) before the clock runs anywhere
        for _ in range(3):
            step()
    conn.send({"flops": flops, "variants": list(made), "threads": torch.get_num_threads()})
    while (name := conn.recv()) is not None:
        for _ in range(3):
            made[name]()
        start = time.perf_counter()
        for _ in range(steps):
            made[name]()
        conn.send(B * T * steps / (time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra dotted KEY=VALUE overrides for the recipe")
    parser.add_argument("--run-dir", type=Path, help="fresh run dir (default runs/bench_shakespeare/NAME-TIME)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--split-dir", type=Path, default=REPO / "runs" / "bench_shakespeare" / "data")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every stage (default: the pipeline's)")
    parser.add_argument("--reference-step", action="store_true",
                        help="only time a nanoGPT-shaped training step against ours in this process, then exit")
    parser.add_argument("--verbose", action="store_true", help="echo every line (progress bars included)")
    args = parser.parse_intermixed_args()

    if args.reference_step:
        sys.path.insert(0, str(REPO))
        print(json.dumps(reference_step_speed(args.threads), indent=1))
        return
    recipe = args.recipe.resolve()
    run_dir = (args.run_dir or REPO / "runs" / "bench_shakespeare" /
               f"{recipe.stem}-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: the benchmark needs a fresh run dir")
    t = time.time()
    split = write_split(args.text, args.split_dir.resolve())
    print(f"split written to {split} in {time.time() - t:.1f} s (not timed)", flush=True)

    load_before = load_average()
    seen = run_pipeline(recipe, run_dir, split, args.overrides, args.threads, quiet=not args.verbose)
    load_after = load_average()
    summary = summarize(run_dir, seen)
    summary.update(recipe=str(recipe), overrides=args.overrides, threads=args.threads,
                   load_before=load_before, load_after=load_after,
                   command=" ".join([sys.executable, *sys.argv]))
    (run_dir / "bench.json").write_text(json.dumps(summary, indent=1))
    print()
    print(report(summary, load_before, load_after))
    print(f"summary: {run_dir / 'bench.json'}")


if __name__ == "__main__":
    main()
