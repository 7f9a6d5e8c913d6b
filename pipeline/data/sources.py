"""Reading stage inputs: text corpora, datasets, tokenizers and checkpoints from any supported source."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import StageError
from pipeline.recipe.schema import InputSpec

TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _hub_name(spec: InputSpec) -> tuple[str, str | None]:
    name = spec.spec.split(":", 1)[1]
    repo, _, revision = name.partition("@")
    return repo, revision or None


def _offline_error(spec: InputSpec, error: Exception) -> StageError:
    return StageError(f"input {spec.name}: could not fetch {spec.spec} from the hub ({type(error).__name__}: "
                      f"{error}). Without a network, point the recipe at a local folder instead")


def load_dataset_input(spec: InputSpec, validation_fraction: float = 0.05, seed: int = 0):
    """A `DatasetDict` with `train` and `validation` splits from any dataset/text source.

    Sources without a validation split get one: `validation_fraction` of the rows, chosen by `seed`.
    """
    import datasets

    if spec.kind == "builtin":
        from pipeline.data.corpus import build_corpus

        return build_corpus(spec.spec.split(":", 1)[1])
    if spec.kind == "hub":
        repo, revision = _hub_name(spec)
        try:
            data = datasets.load_dataset(repo, revision=revision)
        except Exception as e:  # any network/hub failure: say what to do instead
            raise _offline_error(spec, e) from None
    else:
        path = spec.path
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            data = datasets.load_from_disk(str(path))
        else:
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
            if not files:
                raise StageError(f"input {spec.name}: no {', '.join(TEXT_SUFFIXES)} files in {path}")
            kinds = {TEXT_SUFFIXES.get(p.suffix) for p in files}
            if len(kinds) != 1 or None in kinds:
                raise StageError(f"input {spec.name}: {path} mixes file types {sorted(map(str, kinds))}; use one")
            kind = kinds.pop()
            # plain text: one document per blank-line-separated paragraph
            kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
            data = datasets.load_dataset(kind, data_files=[str(p) for p in files], **kwargs)
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({"train": data})
    if "validation" not in data:
        if "train" not in data:
            raise StageError(f"input {spec.name}: {spec.spec} has splits {list(data)}; expected train (and validation)")
        split = data["train"].train_test_split(test_size=validation_fraction, seed=seed)
        data = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return data


def require_columns(dataset, columns: list[str], spec: InputSpec) -> None:
    """Fail before training when a column the stage needs is missing, naming it and the dataset."""
    for split, part in dataset.items():
        missing = [c for c in columns if c not in part.column_names]
        if missing:
            raise StageError(f"input {spec.name} ({spec.spec}), split {split}: missing column(s) "
                             f"{', '.join(missing)}; it has {', '.join(part.column_names)}")


def load_tokenizer_input(spec: InputSpec):
    from transformers import AutoTokenizer

    if spec.kind == "hub":
        repo, revision = _hub_name(spec)
        try:
            return AutoTokenizer.from_pretrained(repo, revision=revision)
        except Exception as e:
            raise _offline_error(spec, e) from None
    if spec.kind != "stage" and spec.kind != "path":
        raise StageError(f"input {spec.name}: {spec.spec} is not a tokenizer")
    if not (Path(spec.path) / "tokenizer_config.json").exists():
        raise StageError(f"input {spec.name}: {spec.path} holds no tokenizer (tokenizer_config.json missing)")
    return AutoTokenizer.from_pretrained(str(spec.path))


def model_path(spec: InputSpec) -> str:
    """A checkpoint reference for `from_pretrained`: a local folder, or a hub repo (downloaded first)."""
    if spec.kind == "hub":
        from huggingface_hub import snapshot_download

        repo, revision = _hub_name(spec)
        try:
            return snapshot_download(repo, revision=revision)
        except Exception as e:
            raise _offline_error(spec, e) from None
    if spec.path is None or not (Path(spec.path) / "config.json").exists():
        raise StageError(f"input {spec.name}: {spec.path} holds no checkpoint (config.json missing)")
    return str(spec.path)


MODEL_KINDS = {
    "causal-lm": "a causal language model (AutoModelForCausalLM)",
    "sequence-classification": "a sequence-classification model, as reward and value models are "
                               "(AutoModelForSequenceClassification)",
}


def model_kind(config: dict) -> str | None:
    """What a checkpoint with this config.json is, decided by transformers' auto-class mappings (not by
    class names: GPT-2's causal LM is `GPT2LMHeadModel`): the kind whose mapping holds its architectures."""
    from transformers.models.auto import modeling_auto as auto

    architectures = set(config.get("architectures") or [])
    for kind, mapping in (("causal-lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("sequence-classification", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)):
        names = {n for v in mapping.values() for n in ((v,) if isinstance(v, str) else v)}
        if architectures & names:
            return kind
    return None


def require_model_kind(path: str, kind: str, spec: InputSpec) -> None:
    """Refuse a checkpoint of the wrong kind (a reward model given as a policy, or the reverse)."""
    import json

    config = json.loads((Path(path) / "config.json").read_text())
    found = model_kind(config)
    if found != kind:
        architectures = config.get("architectures") or ["checkpoint without architectures"]
        what = MODEL_KINDS.get(found, "not a model transformers can load as either kind")
        raise StageError(f"input {spec.name}: {spec.spec} is a {', '.join(architectures)}, {what}; this input needs "
                         f"{MODEL_KINDS[kind]}")


def require_same_tokenizer(inputs: dict[str, InputSpec], names: list[str], reference: str) -> None:
    """Every model input in `names` must tokenize as `reference` does (the same token -> id map, pad tokens
    aside: a reward stage may add its own), else one model would read another's ids as other tokens."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(model_path(inputs[reference]))
    ref_vocab = ref.get_vocab()
    for name in names:
        if name not in inputs or inputs[name].spec == inputs[reference].spec:
            continue
        other = AutoTokenizer.from_pretrained(model_path(inputs[name]))
        vocab = other.get_vocab()
        pads = {ref.pad_token, other.pad_token}
        differ = sorted(t for t in set(vocab) ^ set(ref_vocab) if t not in pads)
        differ += sorted(t for t in set(vocab) & set(ref_vocab) if vocab[t] != ref_vocab[t])
        if differ:
            raise StageError(f"input {name}: its tokenizer ({inputs[name].spec}) differs from input {reference}'s "
                             f"({len(differ)} tokens, e.g. {', '.join(map(repr, differ[:3]))}); the models must "
                             f"share one tokenizer")
