"""The embedded default corpus: English that ships with every CPython.

No dataset can be downloaded where this project's quick start and CI run, so the default recipe
pretrains on text that is always present:

* the interactive help topics of `pydoc_data.topics` (the language reference's prose, ~465K chars);
* the docstrings of every pure-Python module of the standard library (module, class and function
  docstrings, read with `ast` so that nothing is imported), one document per module.

Tests, test-suite folders, `idlelib`, `lib2to3` and `site-packages` are skipped. Documents are
sorted by name so the corpus is identical on every machine with the same Python version; the
validation split is chosen by a hash of the document name, so adding a document never moves others.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from pathlib import Path

BUILTIN_CORPORA = ("stdlib",)
CORPUS_VERSION = "1"  # bump when the builder changes what it produces
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
MIN_DOC_CHARS = 200


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def stdlib_documents() -> list[tuple[str, str]]:
    """(name, text) for every document of the embedded corpus, in a deterministic order."""
    import pydoc_data.topics

    docs = [(f"topic:{name}", text.strip()) for name, text in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS.intersection(rel.parts) or any(p.startswith("test") for p in rel.parts):
            continue
        text = _module_docstrings(path)
        if len(text) >= MIN_DOC_CHARS:
            docs.append((f"module:{rel.with_suffix('').as_posix().replace('/', '.')}", text))
    return docs


def is_validation(name: str, fraction: float) -> bool:
    digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


def build_corpus(name: str, validation_fraction: float = 0.05):
    """A `datasets.DatasetDict` with `train` and `validation` splits, columns `id` and `text`."""
    import datasets

    if name != "stdlib":
        raise ValueError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
    rows = {"train": {"id": [], "text": []}, "validation": {"id": [], "text": []}}
    for doc_id, text in stdlib_documents():
        split = "validation" if is_validation(doc_id, validation_fraction) else "train"
        rows[split]["id"].append(doc_id)
        rows[split]["text"].append(text)
    return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in rows.items()})


def corpus_fingerprint(name: str) -> str:
    """Identifies the embedded corpus: it depends on the builder and the Python that ships the text."""
    return f"builtin:{name}:v{CORPUS_VERSION}:py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
