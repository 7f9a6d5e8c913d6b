"""Model and dataset cards (README.md) for pushed artifacts: hub metadata plus lineage, settings and metrics.

The YAML metadata follows the Hub's card spec: `base_model`, `datasets`, `tags`, `license`, `library_name`,
`pipeline_tag` and a `model-index` holding the stage's metrics (it parses with `huggingface_hub.ModelCard`).
The text shows how to load the artifact and the chain of stages that produced it. Cards are a pure function
of the manifests and the push record, so pushing the same artifact twice gives the same README.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.sources import model_kind

TASKS = {  # auto class -> (pipeline_tag, model-index task type, task name)
    "AutoModelForCausalLM": ("text-generation", "text-generation", "Causal language modeling"),
    "AutoModelForSequenceClassification": ("text-classification", "text-classification", "Reward modeling"),
}


@dataclass
class StageLink:
    """One stage in an artifact's history."""

    stage: str
    fingerprint: str
    inputs: dict[str, str]  # input name -> spec as written in the recipe
    settings: str  # one-line summary
    pushed_as: str | None = None  # repo@revision where this stage's output is on the hub


@dataclass
class CardInfo:
    """Everything a card says; `pipeline.hub.push` fills it from the manifests and the push record."""

    repo_id: str
    revision: str | None
    kind: str  # model | tokenizer | dataset
    stage: str
    output: str
    fingerprint: str
    manifest: dict
    license: str = "apache-2.0"
    base_model: str | None = None  # hub id of the parent checkpoint, when it is on the hub
    base_model_text: str | None = None  # the parent described in words (always set when there is a parent)
    datasets: list[str] = field(default_factory=list)  # hub ids of the data it was made from
    eval_dataset: tuple[str, str] | None = None  # (type, name) for the model-index
    auto_class: str = "AutoModelForCausalLM"
    lineage: list[StageLink] = field(default_factory=list)  # ancestors first, this stage last
    splits: dict[str, dict] = field(default_factory=dict)  # datasets: split -> {rows, files}
    features: dict[str, str] = field(default_factory=dict)  # datasets: column -> type


# --- small helpers ---------------------------------------------------------------------------------------


def auto_class_for(config: dict) -> str:
    """The transformers auto class that loads a checkpoint with this config.json."""
    kind = model_kind(config)
    if kind == "sequence-classification":
        return "AutoModelForSequenceClassification"
    if kind == "causal-lm" or not config.get("architectures"):
        return "AutoModelForCausalLM"
    return "AutoModel"


def numeric_metrics(metrics: dict, prefix: str = "") -> dict[str, float | int]:
    """Finite numbers from a (possibly nested) metrics dict, nested keys joined with '/'."""
    out: dict[str, float | int] = {}
    for key, value in (metrics or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric_metrics(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = value
    return out


# what an evaluation result looks like (the model-index); counts, timings and steps stay in the text table
EVAL_METRIC = re.compile(r"(loss|acc|bpb|bits_per_byte|perplexity|ppl|reward|score|win|kl|judge|f1|exact|bleu|rouge)",
                         re.I)


def eval_metrics(metrics: dict) -> dict[str, float | int]:
    """The top-level numeric metrics that are evaluation results (for the model-index)."""
    return {k: v for k, v in numeric_metrics(metrics).items() if "/" not in k and EVAL_METRIC.search(k)}


def settings_summary(settings: dict | None, limit: int = 600) -> str:
    """`key=value, ...` of a stage's settings (inputs and launch left out; nested keys dotted)."""
    items: list[str] = []

    def walk(d: dict, prefix: str) -> None:
        for key, value in d.items():
            if not prefix and key in ("inputs", "launch", "push"):
                continue
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value is not None:
                items.append(f"{prefix}{key}={json.dumps(value) if not isinstance(value, str) else value}")

    walk(settings or {}, "")
    text = ", ".join(items)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def _rev_arg(revision: str | None) -> str:
    return f', revision="{revision}"' if revision and revision != "main" else ""


def _lineage_text(info: CardInfo) -> list[str]:
    lines = ["## Lineage", ""]
    if info.kind != "dataset":
        if info.base_model_text:
            lines += [f"Parent checkpoint: {info.base_model_text}.", ""]
        elif info.kind == "model":
            lines += ["Trained from a randomly initialised model (no parent checkpoint).", ""]
    lines += ["Produced by the pipeline stages below (oldest first); each fingerprint hashes the stage's settings, "
              "its inputs' fingerprints, the seed and the code version.", "",
              "| stage | fingerprint | inputs | on the hub as |", "| --- | --- | --- | --- |"]
    for link in info.lineage:
        inputs = ", ".join(f"{k}=`{v}`" for k, v in link.inputs.items()) or "none"
        lines.append(f"| {link.stage} | `{link.fingerprint}` | {inputs} | {link.pushed_as or '-'} |")
    lines += ["", "Settings of each stage:", ""]
    lines += [f"- **{link.stage}**: {link.settings or '(defaults)'}" for link in info.lineage]
    return lines + [""]


def _provenance(manifest: dict) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items())
    rows = [("seed", manifest.get("seed")), ("started", manifest.get("started")),
            ("finished", manifest.get("finished")), ("duration (s)", manifest.get("duration_s")),
            ("git commit", manifest.get("git_commit")), ("python", manifest.get("python")), ("libraries", versions)]
    lines = ["## Provenance", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    return lines + [""]


# --- cards -----------------------------------------------------------------------------------------------


def model_card(info: CardInfo) -> str:
    """README.md for a checkpoint or tokenizer folder."""
    name = info.repo_id.split("/")[-1]
    metrics = numeric_metrics(info.manifest.get("metrics") or {})
    tags = ["llm-pipeline", info.stage] + (["rlhf"] if info.stage == "ppo" else [])
    if info.auto_class == "AutoModelForSequenceClassification":
        tags.append("reward-model")
    meta: dict[str, Any] = {}
    if info.base_model:
        meta["base_model"] = info.base_model
    if info.datasets:
        meta["datasets"] = list(info.datasets)
    meta["tags"] = tags
    meta["license"] = info.license
    meta["library_name"] = "transformers"
    pipeline_tag, task_type, task_name = TASKS.get(info.auto_class, (None, "text-generation", "Language modeling"))
    if pipeline_tag and info.kind == "model":
        meta["pipeline_tag"] = pipeline_tag
    results = eval_metrics(info.manifest.get("metrics") or {})
    if results and info.kind == "model":
        ds_type, ds_name = info.eval_dataset or ("local", f"{info.stage} evaluation data")
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": task_type, "name": task_name},
            "dataset": {"type": ds_type, "name": ds_name},
            "metrics": [{"type": k, "name": k, "value": v} for k, v in results.items()],
        }]}]

    rev = _rev_arg(info.revision)
    if info.kind == "tokenizer":
        what = "A tokenizer"
        usage = ["from transformers import AutoTokenizer", "",
                 f'tokenizer = AutoTokenizer.from_pretrained("{info.repo_id}"{rev})']
    else:
        what = "A reward model" if info.auto_class == "AutoModelForSequenceClassification" else "A language model"
        usage = [f"from transformers import {info.auto_class}, AutoTokenizer", "",
                 f'model = {info.auto_class}.from_pretrained("{info.repo_id}"{rev})',
                 f'tokenizer = AutoTokenizer.from_pretrained("{info.repo_id}"{rev})']
    lines = ["---", _yaml(meta).rstrip(), "---", "", f"# {name}", "",
             f"{what} produced by the `{info.stage}` stage of llm-pipeline (output `{info.output}`, "
             f"fingerprint `{info.fingerprint}`). Weights are in safetensors.", "",
             "## How to load", "", "```python", *usage, "```", ""]
    lines += _lineage_text(info)
    if metrics:
        lines += ["## Metrics", "", f"Recorded by the `{info.stage}` stage when it finished.", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += _provenance(info.manifest)
    return "\n".join(lines)


def dataset_card(info: CardInfo) -> str:
    """README.md for a `datasets` save_to_disk folder pushed as it is."""
    name = info.repo_id.split("/")[-1]
    meta: dict[str, Any] = {"license": info.license, "tags": ["llm-pipeline", info.stage], "pretty_name": name}
    if info.splits:
        meta["configs"] = [{"config_name": "default", "data_files": [
            {"split": split, "path": files} for split, s in info.splits.items() if (files := s.get("files"))]}]
    rev = _rev_arg(info.revision)
    lines = ["---", _yaml(meta).rstrip(), "---", "", f"# {name}", "",
             f"A dataset produced by the `{info.stage}` stage of llm-pipeline (output `{info.output}`, "
             f"fingerprint `{info.fingerprint}`), uploaded exactly as `datasets.save_to_disk` wrote it "
             f"(Arrow files, byte for byte).", "",
             "## How to load", "", "```python", "from datasets import load_from_disk",
             "from huggingface_hub import snapshot_download", "",
             f'data = load_from_disk(snapshot_download("{info.repo_id}", repo_type="dataset"{rev}))', "```", "",
             "`datasets.load_dataset` also reads it through the `configs` in this card's metadata.", ""]
    if info.splits:
        lines += ["## Contents", "", "| split | rows |", "| --- | --- |"]
        lines += [f"| {split} | {s.get('rows', '?')} |" for split, s in info.splits.items()]
        lines.append("")
        if info.features:
            lines += ["Columns: " + ", ".join(f"`{k}` ({v})" for k, v in info.features.items()), ""]
    lines += _lineage_text(info)
    lines += _provenance(info.manifest)
    return "\n".join(lines)


def dataset_layout(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Splits (rows, arrow file pattern) and column types of a save_to_disk folder, read without `datasets`."""
    path = Path(path)
    if (path / "dataset_dict.json").exists():
        names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        dirs = {name: path / name for name in names}
    else:
        dirs = {"train": path}
    splits: dict[str, dict] = {}
    features: dict[str, str] = {}
    for split, d in dirs.items():
        files = sorted(p.name for p in d.glob("*.arrow"))
        rel = "" if d == path else f"{split}/"
        splits[split] = {"files": f"{rel}*.arrow" if files else None, "rows": _arrow_rows([d / f for f in files])}
        info_file = d / "dataset_info.json"
        if not features and info_file.exists():
            feats = json.loads(info_file.read_text()).get("features") or {}
            features = {k: _feature_type(v) for k, v in feats.items()}
    return splits, features


def _arrow_rows(files: list[Path]) -> int | None:
    try:
        import pyarrow as pa

        rows = 0
        for f in files:
            with pa.memory_map(str(f)) as source:
                rows += pa.ipc.open_stream(source).read_all().num_rows
        return rows
    except Exception:  # noqa: BLE001 - the row count is decoration; never fail a push over it
        return None


def _feature_type(feature: Any) -> str:
    if isinstance(feature, dict):
        if "dtype" in feature:
            return str(feature["dtype"])
        if feature.get("_type") in ("Sequence", "List", "LargeList"):
            return f"list<{_feature_type(feature.get('feature'))}>"
        return str(feature.get("_type", "struct"))
    if isinstance(feature, list) and feature:
        return f"list<{_feature_type(feature[0])}>"
    return str(feature)
