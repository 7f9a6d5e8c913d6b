"""The run report: one Markdown page with every stage's status and metrics, the curves, and samples.

    python -m pipeline report runs/tiny        # writes runs/tiny/report.md and runs/tiny/plots/*.png

Built only from what the stages published (manifests, metrics.jsonl, train_log.jsonl, evaluation
results), so it can be regenerated at any time and never disagrees with the artifacts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.recipe.stages import STAGE_TYPES
from pipeline.runner.artifacts import MANIFEST, read_jsonl, read_manifest

KEY_METRICS = ("vocab_size", "bytes_per_token_validation", "train_blocks", "parameters", "steps", "final_val_loss",
               "final_val_bpb", "final_val_accuracy", "tokens_per_s", "final_reward_raw", "final_kl",
               "pass_rate", "judge_sft", "judge_ppo", "win_rate_ppo_vs_sft_judge", "kl_ppo_to_sft")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items() if not isinstance(v, (dict, list)) and "/" not in k)
    return str(value)


def stage_dirs(run_dir: Path) -> list[tuple[str, dict | None]]:
    """(stage, manifest or None) for every stage folder, in the order the stages finished."""
    found = []
    for path in sorted(run_dir.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and path.name != "plots":
            found.append((path.name, read_manifest(path)))
    return sorted(found, key=lambda item: (item[1] is None, (item[1] or {}).get("finished", "")))


def plot_curves(run_dir: Path, out_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    curves = [(stage, *curve) for stage, cls in STAGE_TYPES.items() for curve in cls.CURVES]  # declared per stage
    for stage, file, x, y, title, ylabel in curves:
        rows = [r for r in read_jsonl(run_dir / stage / file) if r.get(y) is not None]
        if not rows:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o" if len(rows) < 30 else None, linewidth=1.4)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{stage}_{y.replace('/', '_')}.png"
        fig.savefig(path)
        plt.close(fig)
        made.append((title, path))
    return made


def _samples_section(run_dir: Path) -> list[str]:
    samples = read_jsonl(run_dir / "evaluate" / "results" / "samples.jsonl")
    if not samples:
        return []
    lines = ["## Sample generations (held-out prompts; judge score in brackets)", ""]
    for row in samples:
        lines.append(f"**Prompt:** {row['prompt']}")
        lines.append("")
        for name in ("sft", "ppo"):
            if name in row:
                text = row[name]["response"].replace("\n", " ") or "(empty)"
                score = f" [{row[name]['judge']:.2f}]" if "judge" in row[name] else ""  # task prompts only
                lines.append(f"- {name.upper()}{score}: `{text}`")
        lines.append("")
    return lines


def _evaluation_section(run_dir: Path) -> list[str]:
    path = run_dir / "evaluate" / "results" / "metrics.json"
    if not path.is_file():
        return []
    m = json.loads(path.read_text())
    lines = ["## Evaluation", "", "| measure | value |", "| --- | --- |"]
    for name, value in m.get("bits_per_byte", {}).items():
        lines.append(f"| validation bits per byte, {name} | {value:.4f} |")
    if "bits_per_byte_unigram_baseline" in m:
        lines.append(f"| validation bits per byte, unigram baseline | {m['bits_per_byte_unigram_baseline']:.4f} |")
    for name in ("sft", "ppo"):
        if f"judge_{name}" in m:
            j = m[f"judge_{name}"]
            lines.append(f"| judge on held-out prompts, {name}: mean score / pass rate | {j['mean_score']:.3f} / {j['pass_rate']:.3f} |")
    for key, label in (("win_rate_ppo_vs_sft_judge", "PPO-vs-SFT win rate (judge)"),
                       ("win_rate_ppo_vs_sft_reward_model", "PPO-vs-SFT win rate (reward model)"),
                       ("kl_ppo_to_sft", "KL(PPO || SFT), nats per response")):
        if key in m:
            lines.append(f"| {label} | {m[key]:.3f} |")
    for name, value in m.get("reward_model_mean", {}).items():
        lines.append(f"| reward-model mean score, {name} answers | {value:.3f} |")
    agreement = m.get("reward_model_vs_judge") or {}
    for kind, label in (("", "all"), ("/constraints_differ", "a constraint differs"),
                        ("/faithfulness_only", "only the copied content differs")):
        if agreement.get(f"accuracy{kind}") is not None:
            lines.append(f"| reward model orders SFT/PPO answers as the judge does, {label} | "
                         f"{agreement[f'accuracy{kind}']:.3f} ({agreement[f'pairs{kind}']} pairs) |")
    contamination = m.get("contamination")
    if contamination:
        lines += ["", f"Contamination check ({contamination['ngram']}-gram overlap of the held-out "
                  f"`{contamination.get('checked_column', 'prompt')}` texts with training data; flagged when at least "
                  f"{contamination['threshold']:.0%} of their n-grams occur):", "",
                  "| training source | mean overlap | flagged |", "| --- | --- | --- |"]
        for source, r in contamination["sources"].items():
            lines.append(f"| {source} | {r['mean_overlap']:.3f} | {r['flagged']} ({r['flagged_fraction']:.1%}) |")
    return lines + [""]


def build_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md (and plots/); returns its path."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    stages = stage_dirs(run_dir)
    lines = [f"# Run report: {run_dir.name}", "", f"Run folder `{run_dir}`.", "",
             "| stage | status | duration | key metrics | fingerprint | parents |", "| --- | --- | --- | --- | --- | --- |"]
    for name, manifest in stages:
        if manifest is None:
            lines.append(f"| {name} | incomplete (no complete {MANIFEST}) | | | | |")
            continue
        metrics = manifest.get("metrics", {})
        key = "; ".join(f"{k} {_fmt(metrics[k])}" for k in KEY_METRICS if k in metrics and not isinstance(metrics[k], list))
        parents = ", ".join(f"{v['spec']}" for v in manifest.get("inputs", {}).values())
        lines.append(f"| {name} | done {manifest.get('finished', '')[:19]} | {manifest.get('duration_s', 0):.1f} s | "
                     f"{key} | `{manifest['fingerprint']}` | {parents} |")
    lines.append("")
    lines += _evaluation_section(run_dir)
    plots = plot_curves(run_dir, run_dir / "plots")
    if plots:
        lines += ["## Curves", ""]
        lines += [f"![{title}](plots/{path.name})" for title, path in plots]
        lines.append("")
    lines += _samples_section(run_dir)
    out = run_dir / "report.md"
    tmp = out.with_name(f".report.md.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return out
