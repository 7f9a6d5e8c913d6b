"""Stage outputs on disk: fingerprints, manifests and atomic publishing.

A stage's published folder is `RUN_DIR/STAGE/` holding one subfolder per output (`tokenizer/`,
`dataset/`, `model/`, ...) and `manifest.json`. The manifest is written last, atomically, and carries
`"complete": true`; a folder without such a manifest is never treated as done. A stage works in
`RUN_DIR/.work/STAGE/` (checkpoints, staging of outputs), which survives a crash so training resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from datetime import UTC
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
NOT_FINGERPRINTED = ("inputs", "launch", "push")  # how and where a stage runs or publishes, not what it makes


def fingerprint(data: Any) -> str:
    """Stable short hash of JSON-able data."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def path_fingerprint(path: Path) -> str:
    """A local input: a published artifact's own fingerprint, else names, sizes and mtimes of its files."""
    path = Path(path)
    if (manifest := read_manifest(path)) is not None:
        return manifest["fingerprint"]
    if (manifest := read_manifest(path.parent)) is not None:  # one output of a published stage
        return f"{manifest['fingerprint']}:{path.name}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not _is_cache(p))
    stats = [(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return fingerprint(stats)


def _is_cache(path: Path) -> bool:
    """Files `datasets` writes next to a saved dataset when it is mapped: not part of the data."""
    return path.name.startswith(("cache-", "tmp")) and path.suffix == ".arrow" or path.name.endswith(".lock")


def input_fingerprint(spec, stage_fingerprints: dict[str, str]) -> str:
    """What identifies an input: the producing stage's fingerprint, the files, or the corpus/hub name."""
    from pipeline.data.corpus import corpus_fingerprint

    if spec.kind == "stage":
        return f"{stage_fingerprints[spec.stage]}:{spec.output}"
    if spec.kind == "builtin":
        return corpus_fingerprint(spec.spec.split(":", 1)[1])
    if spec.kind == "hub":
        return spec.spec
    return path_fingerprint(spec.path)


def stage_fingerprint(recipe, name: str, input_fps: dict[str, str]) -> str:
    """Hash of everything that determines a stage's outputs: its type version, settings, inputs, seed."""
    from pipeline.recipe.config import to_dict

    settings = recipe.settings[name]
    data = {
        "stage": name,
        "version": settings.VERSION,
        "settings": {k: v for k, v in to_dict(settings).items() if k not in NOT_FINGERPRINTED},
        "inputs": input_fps,
        "seed": recipe.seed,
    }
    if settings.USES_MODEL:
        data["model"] = to_dict(recipe.model)
    return fingerprint(data)


def planned_fingerprints(recipe) -> dict[str, tuple[str, dict[str, str]]]:
    """Fingerprint of every stage (and of each of its inputs) as the recipe says it will be."""
    out: dict[str, tuple[str, dict[str, str]]] = {}
    stage_fps: dict[str, str] = {}
    for name in recipe.order():
        inputs = {k: input_fingerprint(v, stage_fps) for k, v in recipe.inputs[name].items()}
        stage_fps[name] = stage_fingerprint(recipe, name, inputs)
        out[name] = (stage_fps[name], inputs)
    return out


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest if it is complete, else None (missing, half-written or from a crash)."""
    try:
        manifest = json.loads((Path(stage_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("complete") is True else None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL log we wrote (train_log.jsonl, metrics.jsonl, samples.jsonl); none if it is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(staging: Path, final: Path, manifest: dict) -> None:
    """Move `staging` into place as `final` and mark it done; the old outputs go only on success.

    Order matters for crash safety: the old manifest is removed first (so an interrupted publish
    leaves nothing marked done), the folders are swapped by rename, the manifest is written last.
    """
    final = Path(final)
    old = final.with_name(f".{final.name}.old-{int(time.time() * 1000)}")
    if final.exists():
        (final / MANIFEST).unlink(missing_ok=True)
        os.rename(final, old)
    os.rename(staging, final)
    write_json_atomic(final / MANIFEST, {**manifest, "complete": True})
    shutil.rmtree(old, ignore_errors=True)


def make_manifest(*, stage: str, fingerprint: str, inputs: dict, outputs: list[str], settings: dict, metrics: dict,
                  started: float, model: dict | None = None, seed: int | None = None) -> dict:
    """The manifest of a published artifact (stages and labeling exports): what made it, from what, when."""
    return {"stage": stage, "fingerprint": fingerprint, "inputs": inputs, "outputs": outputs, "settings": settings,
            "model": model, "seed": seed, "metrics": metrics, **provenance(started)}


def provenance(started: float) -> dict:
    """When and with what an artifact was made: manifest fields every producer writes."""
    import sys
    from datetime import datetime

    return {
        "started": datetime.fromtimestamp(started, UTC).isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "duration_s": round(time.time() - started, 3),
        "versions": library_versions(),
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "datasets", "tokenizers", "accelerate", "deepspeed", "trl", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    import subprocess

    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
