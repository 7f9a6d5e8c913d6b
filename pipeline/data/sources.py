"""Reading stage inputs: text corpora, datasets, tokenizers and checkpoints from any supported source."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import StageError
from pipeline.recipe.schema import InputSpec, parse_hub_spec

# file endings -> the `datasets` builder that reads them (compressed files are read as they are)
FILE_KINDS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
              ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev", "eval"),
               "test": ("test", "testing")}
_SPLIT_WORD = re.compile(r"^([a-z]+)(?=$|[-_.\d])")


def file_kind(path: Path) -> str | None:
    """The builder for a data file (`train.jsonl.gz` -> json), None for anything else."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FILE_KINDS.get(suffixes[-1]) if suffixes else None


def split_of(path: Path, root: Path) -> str | None:
    """The split a file belongs to by its name or a folder's, as Hub snapshots lay them out
    (`train.jsonl`, `data/validation-00000-of-00001.parquet`, `test/part0.csv`); None: unnamed."""
    for part in reversed(path.relative_to(root).parts if path != root else (path.name,)):
        m = _SPLIT_WORD.match(part.lower())
        for split, names in SPLIT_NAMES.items():
            if m and m.group(1) in names:
                return split
    return None


def _hub_error(spec: InputSpec, error: Exception) -> StageError:
    """What went wrong with a hub input, in words the user can act on."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "config name is missing" in text.lower() or "builderconfig" in text.lower():
        repo, _, revision = parse_hub_spec(spec.spec)
        return StageError(f"input {spec.name}: {repo} has several configs; name one as hub:{repo}:CONFIG"
                          f"{'@' + revision if revision else ''} ({text})")
    return StageError(f"input {spec.name}: could not fetch {spec.spec} from the hub ({type(error).__name__}: "
                      f"{text}). Without a network, point the recipe at a local folder instead")


def load_dataset_input(spec: InputSpec, validation_fraction: float = 0.05, seed: int = 0,
                       columns: dict[str, str] | None = None):
    """A `DatasetDict` with `train` and `validation` splits from any dataset/text source, its columns
    renamed by `columns` ({name in the data: name the stage reads}, a recipe's `columns:` setting).

    Sources without a validation split get one: `validation_fraction` of the rows, chosen by `seed`.
    """
    data = _load_dataset_input(spec, validation_fraction, seed)
    if columns:
        found = data["train"].column_names
        missing = [c for c in columns if c not in found]
        if missing:
            raise StageError(f"input {spec.name} ({spec.spec}): columns: no column {', '.join(missing)} to rename; "
                             f"it has {', '.join(found)}")
        data = data.rename_columns(columns)
    return data


def _load_dataset_input(spec: InputSpec, validation_fraction: float, seed: int):
    import datasets

    if spec.kind == "builtin":
        from pipeline.data.corpus import build_corpus

        return build_corpus(spec.spec.split(":", 1)[1])
    if spec.kind == "hub":
        repo, config, revision = parse_hub_spec(spec.spec)
        try:
            data = datasets.load_dataset(repo, config, revision=revision)
        except Exception as e:  # any network/hub failure: say what to do instead
            raise _hub_error(spec, e) from None
    else:
        path = spec.path
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            data = datasets.load_from_disk(str(path))
        else:
            data = _load_files(spec, path)
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({"train": data})
    if "train" not in data:
        raise StageError(f"input {spec.name}: {spec.spec} has splits {', '.join(data)}; expected train (and "
                         f"validation or test)")
    if "validation" not in data:
        if "test" in data:  # the held-out split the data came with
            data = datasets.DatasetDict({**data, "validation": data["test"]})
        else:
            split = data["train"].train_test_split(test_size=validation_fraction, seed=seed)
            data = datasets.DatasetDict({**data, "train": split["train"], "validation": split["test"]})
    return data


def _load_files(spec: InputSpec, path: Path):
    """A data file or a folder of them: one kind of file, split by file or folder names."""
    import datasets

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p)
                                                 and not any(x.startswith(".") for x in p.relative_to(path).parts))
    if not files:
        raise StageError(f"input {spec.name}: no data files ({', '.join(FILE_KINDS)}, optionally compressed) in {path}")
    kinds = {file_kind(p) for p in files}
    if len(kinds) != 1 or None in kinds:
        found = ", ".join(sorted(f"{p.name}" for p in files)[:6])
        raise StageError(f"input {spec.name}: {path} holds files of several kinds ({', '.join(sorted(map(str, kinds)))}: "
                         f"{found}); keep one kind per folder")
    kind = kinds.pop()
    splits: dict[str, list[str]] = {}
    root = path if path.is_dir() else path.parent
    for p in files:
        splits.setdefault(split_of(p, root) or "train", []).append(str(p))
    # plain text: one document per blank-line-separated paragraph
    kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
    try:
        return datasets.load_dataset(kind, data_files=splits, **kwargs)
    except Exception as e:  # a malformed file: name it
        raise StageError(f"input {spec.name}: could not read {path} as {kind} ({type(e).__name__}: {e})") from None



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
        repo, _, revision = parse_hub_spec(spec.spec)
        try:
            return AutoTokenizer.from_pretrained(repo, revision=revision)
        except Exception as e:
            raise _hub_error(spec, e) from None
    if spec.kind != "stage" and spec.kind != "path":
        raise StageError(f"input {spec.name}: {spec.spec} is not a tokenizer")
    if not (Path(spec.path) / "tokenizer_config.json").exists():
        raise StageError(f"input {spec.name}: {spec.path} holds no tokenizer (tokenizer_config.json missing)")
    return AutoTokenizer.from_pretrained(str(spec.path))


def model_path(spec: InputSpec) -> str:
    """A checkpoint reference for `from_pretrained`: a local folder, or a hub repo (downloaded first)."""
    if spec.kind == "hub":
        from huggingface_hub import snapshot_download

        repo, _, revision = parse_hub_spec(spec.spec)
        try:
            return snapshot_download(repo, revision=revision)
        except Exception as e:
            raise _hub_error(spec, e) from None
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
