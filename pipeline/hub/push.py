"""Push published artifacts (checkpoints, tokenizers, datasets) to a Hugging Face hub repo, with a card.

    python -m pipeline push runs/tiny/pretrain/model --repo ORG/NAME [--private] [--revision BRANCH] [--endpoint URL]
    python -m pipeline push runs/tiny/prepare --repo ORG/NAME        # a stage folder: its primary output

The token comes from `HF_TOKEN` or `hf auth login` (huggingface_hub's `get_token()`); it is handed to the
client in memory and never written anywhere. A push makes the repo revision an exact copy of the artifact
folder plus a generated README.md (pipeline/hub/model_card.py); unchanged files are not uploaded again and an
unchanged artifact makes no commit, so re-running a push is cheap and an interrupted one completes.
Each successful push is recorded in `RUN_DIR/.pushes.json` (artifact fingerprint -> repo, revision,
commit, endpoint) so that a child stage's card can name its parent's repo as `base_model`.

huggingface_hub is imported inside functions: `python -m pipeline` imports this module and must start fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.recipe.schema import parse_hub_spec
from pipeline.recipe.settings import REPO_ID, PushSettings
from pipeline.recipe.stages import STAGE_TYPES
from pipeline.runner.artifacts import MANIFEST, read_manifest, write_json_atomic

log = logging.getLogger("pipeline")

PUSHES = ".pushes.json"
PUBLIC_HOSTS = ("huggingface.co", "hf.co")
# weights in pickle-based formats: loading them runs arbitrary code, so they are never uploaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
PRIMARY_OUTPUTS = ("model", "dataset", "tokenizer")  # a stage folder pushes the first it has


class PushError(RuntimeError):
    """A push that cannot go on, with a reason the user can act on (never containing the token)."""


@dataclass
class Artifact:
    """A published stage output, ready to push."""

    path: Path  # the output folder (RUN_DIR/STAGE/OUTPUT)
    output: str
    manifest: dict
    kind: str  # model | tokenizer | dataset

    @property
    def stage_dir(self) -> Path:
        return self.path.parent

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent

    @property
    def stage(self) -> str:
        return self.manifest.get("stage") or self.stage_dir.name

    @property
    def fingerprint(self) -> str:
        """Same string a consuming stage records as this input's fingerprint (artifacts.path_fingerprint)."""
        return f"{self.manifest['fingerprint']}:{self.output}"

    @property
    def repo_type(self) -> str:
        return "dataset" if self.kind == "dataset" else "model"


# --- finding what to push --------------------------------------------------------------------------------


def artifact_kind(path: Path) -> str:
    """model (a save_pretrained checkpoint), tokenizer, or dataset (a save_to_disk folder)."""
    names = {p.name for p in path.iterdir()}
    if names & {"dataset_dict.json", "state.json"}:
        return "dataset"
    if "config.json" in names:
        if not any(n.endswith(".safetensors") for n in names):
            raise PushError(f"{path}: a checkpoint without safetensors weights (config.json but no *.safetensors)")
        return "model"
    if names & {"tokenizer.json", "tokenizer_config.json"}:
        return "tokenizer"
    raise PushError(f"{path}: neither a checkpoint (config.json + safetensors), a tokenizer nor a saved dataset")


def resolve_artifact(path: str | Path) -> Artifact:
    """The published output at `path`: an output folder, or a stage folder (then its primary output)."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise PushError(f"{path}: no such folder")
    manifest = read_manifest(path)
    if manifest is not None:  # a stage folder
        outputs = [o for o in manifest.get("outputs") or [] if (path / o).is_dir()]
        if len(outputs) == 1:
            return _artifact(path / outputs[0], manifest)
        primary = next((o for o in PRIMARY_OUTPUTS if o in outputs), None)
        if primary is None:
            raise PushError(f"{path}: stage has outputs {', '.join(outputs) or 'none'}; name one as {path}/OUTPUT")
        return _artifact(path / primary, manifest)
    if (path / MANIFEST).exists():
        raise PushError(f"{path}: the manifest is not complete (the stage did not finish); nothing to push")
    manifest = read_manifest(path.parent)
    if manifest is None:
        raise PushError(f"{path} is not a published stage output: neither it nor {path.parent} holds a complete "
                        f"{MANIFEST} (push what `python -m pipeline run` published, e.g. runs/tiny/pretrain/model)")
    if path.name not in (manifest.get("outputs") or []):
        raise PushError(f"{path}: not one of the outputs of stage {manifest.get('stage')!r} "
                        f"({', '.join(manifest.get('outputs') or [])})")
    return _artifact(path, manifest)


def _artifact(path: Path, manifest: dict) -> Artifact:
    pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise PushError(f"{path}: holds pickle-format weights ({', '.join(pickles[:5])}); only safetensors are "
                        f"pushed: re-save with save_pretrained(..., safe_serialization=True) and remove them")
    return Artifact(path, path.name, manifest, artifact_kind(path))


def files_to_upload(path: Path) -> dict[str, Path]:
    """path in repo -> local file: everything but hidden files/folders and a README.md we replace."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if rel.as_posix() == "README.md":
            continue
        out[rel.as_posix()] = p
    return out


# --- the push record ---------------------------------------------------------------------------------------


def read_pushes(run_dir: Path) -> dict[str, dict]:
    try:
        data = json.loads((Path(run_dir) / PUSHES).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_push(run_dir: Path, fingerprint: str, entry: dict) -> None:
    """Remember where an artifact went (repo, revision, commit, endpoint; never a token)."""
    pushes = read_pushes(run_dir)
    pushes[fingerprint] = entry
    write_json_atomic(Path(run_dir) / PUSHES, pushes)


def _public_endpoint(endpoint: str) -> str:
    """The endpoint without user:password@ (it goes into the push record and messages)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _pushed_as(fingerprint: str, run_dirs: list[Path], endpoint: str) -> dict | None:
    for run_dir in run_dirs:
        entry = read_pushes(run_dir).get(fingerprint)
        if entry and entry.get("endpoint") == endpoint:
            return entry
    return None


# --- lineage -------------------------------------------------------------------------------------------------


def _input_manifest(inp: dict) -> tuple[Path | None, dict | None]:
    """For a stage/path input: its local path and the manifest of the stage that published it (if any)."""
    if inp.get("kind") not in ("stage", "path") or not inp.get("path"):
        return None, None
    path = Path(inp["path"])
    return path, read_manifest(path) or read_manifest(path.parent)


def _declared(stage: str, name: str) -> str | None:
    """What the stage type says input `name` is (model, dataset, text, tokenizer), if it is known here."""
    return STAGE_TYPES[stage].INPUTS.get(name) if stage in STAGE_TYPES else None


def _is_model_input(stage: str, name: str, inp: dict) -> bool:
    path, _ = _input_manifest(inp)
    if path is not None and path.is_dir():
        return (path / "config.json").exists()
    declared = _declared(stage, name)
    if declared is not None:
        return declared == "model"
    return inp.get("kind") == "hub" and any(w in name for w in ("model", "policy", "base", "init", "sft"))


def _is_dataset_input(stage: str, name: str, inp: dict) -> bool:
    path, _ = _input_manifest(inp)
    if path is not None and path.is_dir():
        return bool({p.name for p in path.iterdir()} & {"dataset_dict.json", "state.json"})
    declared = _declared(stage, name)
    if declared is not None:
        return declared in ("dataset", "text")
    return inp.get("kind") == "hub" and any(w in name for w in ("data", "corpus", "prompts", "preferences"))


def _hub_name(spec: str) -> str:
    return parse_hub_spec(spec)[0]


def card_info(artifact: Artifact, repo_id: str, revision: str | None, license: str, endpoint: str):
    """Everything the card says about `artifact`, from its manifest, its ancestors' and the push records."""
    from pipeline.hub.model_card import CardInfo, StageLink, auto_class_for, dataset_layout, settings_summary

    manifest = artifact.manifest
    info = CardInfo(repo_id=repo_id, revision=revision, kind=artifact.kind, stage=artifact.stage,
                    output=artifact.output, fingerprint=artifact.fingerprint, manifest=manifest, license=license)

    def run_dirs_of(path: Path | None) -> list[Path]:
        dirs = [artifact.run_dir]
        if path is not None and path.parent.parent not in dirs:
            dirs.append(path.parent.parent)
        return dirs

    def pushed(inp: dict) -> dict | None:
        path, _ = _input_manifest(inp)
        return _pushed_as(inp.get("fingerprint", ""), run_dirs_of(path), endpoint)

    # parent checkpoint: the first model input that is not a reward/value/reference model, else the first
    inputs = manifest.get("inputs") or {}
    models = [(n, i) for n, i in inputs.items() if _is_model_input(artifact.stage, n, i)]
    models.sort(key=lambda ni: any(w in ni[0] for w in ("reward", "value", "ref")))
    if models:
        name, inp = models[0]
        entry = pushed(inp)
        if inp.get("kind") == "hub":
            info.base_model = _hub_name(inp["spec"])
            info.base_model_text = f"`{info.base_model}` on the hub (input `{name}`: `{inp['spec']}`)"
        elif entry is not None:
            info.base_model = entry["repo"]
            info.base_model_text = (f"`{entry['repo']}` (revision `{entry['revision']}`), the `{inp['spec']}` "
                                    f"checkpoint with fingerprint `{inp.get('fingerprint')}`")
        else:
            info.base_model_text = (f"the local checkpoint `{inp['spec']}` (fingerprint `{inp.get('fingerprint')}`, "
                                    f"not pushed to this hub)")
    for name, inp in inputs.items():
        if not _is_dataset_input(artifact.stage, name, inp):
            continue
        entry = pushed(inp)
        hub_id = _hub_name(inp["spec"]) if inp.get("kind") == "hub" else entry["repo"] if entry else None
        if hub_id and hub_id not in info.datasets:
            info.datasets.append(hub_id)
        if info.eval_dataset is None:
            info.eval_dataset = (hub_id or inp["spec"], f"{hub_id or inp['spec']} (validation split)")

    if artifact.kind == "model":
        config = json.loads((artifact.path / "config.json").read_text())
        info.auto_class = auto_class_for(config)
    if artifact.kind == "dataset":
        info.splits, info.features = dataset_layout(artifact.path)

    # the chain of stages, ancestors first
    seen: set[str] = set()
    chain: list = []

    def visit(m: dict, stage_dir: Path, depth: int = 0) -> None:
        if m.get("fingerprint") in seen or depth > 50:
            return
        seen.add(m.get("fingerprint"))
        for inp in (m.get("inputs") or {}).values():
            path, parent = _input_manifest(inp)
            if parent is not None:
                visit(parent, path if read_manifest(path) else path.parent, depth + 1)
        records = {**read_pushes(artifact.run_dir), **read_pushes(stage_dir.parent)}
        entries = [e for k, e in sorted(records.items())
                   if k.startswith(f"{m.get('fingerprint')}:") and e.get("endpoint") == endpoint]
        chain.append(StageLink(m.get("stage", stage_dir.name), m.get("fingerprint", "?"),
                               {k: v.get("spec", "?") for k, v in (m.get("inputs") or {}).items()},
                               settings_summary(m.get("settings")),
                               ", ".join(f"`{e['repo']}@{e['revision']}`" for e in entries) or None))

    visit(manifest, artifact.stage_dir)
    if chain and chain[-1].fingerprint == manifest.get("fingerprint"):
        chain[-1].pushed_as = f"`{repo_id}@{revision or 'main'}` (this repo)"
    info.lineage = chain
    return info


def render_card(artifact: Artifact, repo_id: str, revision: str | None, license: str, endpoint: str) -> str:
    from pipeline.hub.model_card import dataset_card, model_card

    info = card_info(artifact, repo_id, revision, license, endpoint)
    return dataset_card(info) if artifact.kind == "dataset" else model_card(info)


# --- talking to the hub ------------------------------------------------------------------------------------


def resolve_token(token: str | None = None) -> str:
    """The token to push with: the argument, else HF_TOKEN, else the one `hf auth login` stored."""
    if token:
        return token
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def resolve_endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


@contextmanager
def _plain_lfs_unless_public(endpoint: str) -> Iterator[None]:
    """Upload through plain LFS (not Xet) to any hub but huggingface.co: other servers do not speak Xet."""
    from huggingface_hub import constants

    old = constants.HF_HUB_DISABLE_XET
    if (urlsplit(endpoint).hostname or "") not in PUBLIC_HOSTS:
        constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = old


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _root_cause(exc: BaseException):
    """The first HTTP or transport error in the exception's chain (LFS uploads wrap theirs)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - older huggingface_hub
        import httpx
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (HfHubHTTPError, httpx.TransportError, ConnectionError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def _hub_errors(endpoint: str, token: str, repo_id: str) -> Iterator[None]:
    """Turn client exceptions into PushErrors that name the endpoint and never the token."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except PushError:
        raise
    except Exception as e:  # noqa: BLE001 - translated below or re-raised
        cause = _root_cause(e)
        if cause is None:
            raise PushError(_scrub(f"push to {repo_id} at {endpoint} failed: {type(e).__name__}: {e}", token)) from None
        if not isinstance(cause, HfHubHTTPError):
            raise PushError(_scrub(f"cannot reach the hub at {endpoint}: {type(cause).__name__}: {cause}", token)) from None
        status = cause.response.status_code if cause.response is not None else None
        server_msg = cause.response.headers.get("X-Error-Message", "") if cause.response is not None else ""
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        if status == 401 and ("Invalid credentials" in server_msg or "Invalid user token" in str(cause)):
            msg = (f"the hub at {endpoint} rejected the token (401): it is invalid or expired; "
                   f"set HF_TOKEN to a valid write token or run `hf auth login`")
        elif status in (401, 403, 404) and cause.response is not None and \
                cause.response.headers.get("X-Error-Code") in ("RepoNotFound", None):
            msg = (f"the hub at {endpoint} refused access to {repo_id} ({status}): the token cannot write to "
                   f"that namespace ({server_msg or first_line})")
        else:
            msg = f"the hub at {endpoint} answered {status}: {server_msg or first_line}"
        raise PushError(_scrub(msg, token)) from None


def push_artifact(path: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                  endpoint: str | None = None, token: str | None = None, license: str | None = None,
                  commit_message: str | None = None) -> str:
    """Push a published output (or a stage folder's primary output) to hub repo `repo_id`; returns repo@revision.

    The repo (model repo, or dataset repo for a dataset) is created if missing; `revision` names a branch,
    created from main if missing. The revision ends up holding exactly the artifact's files plus a
    generated README.md: remote files the artifact does not have are deleted in the same commit.
    Unchanged files are not uploaded and an unchanged artifact makes no commit.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    if not REPO_ID.match(repo_id):
        raise PushError(f"{repo_id!r} is not a hub repo name like ORG/NAME")
    artifact = resolve_artifact(path)
    token = resolve_token(token)
    endpoint = resolve_endpoint(endpoint)
    public_endpoint = _public_endpoint(endpoint)
    license = license or "apache-2.0"
    branch = revision or "main"
    files = files_to_upload(artifact.path)
    card = render_card(artifact, repo_id, revision, license, public_endpoint)
    repo_type = artifact.repo_type
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(public_endpoint, token, repo_id), _plain_lfs_unless_public(endpoint):
        user = api.whoami()  # a bad token or an unreachable hub fails here, before any work
        log.info("pushing %s (%s) to %s %s@%s at %s as %s", artifact.path, artifact.kind, repo_type, repo_id,
                 branch, public_endpoint, user.get("name"))
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
        repo_info = api.repo_info(repo_id, repo_type=repo_type, revision=branch)
        head = repo_info.sha
        if private and not repo_info.private:
            log.warning("%s already exists and is public: --private only applies when the repo is created", repo_id)
        remote = set(api.list_repo_files(repo_id, repo_type=repo_type, revision=branch))
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in files.items()]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
        stale = sorted(remote - set(files) - {"README.md", ".gitattributes"})
        ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
        message = commit_message or f"{artifact.stage}/{artifact.output} {artifact.fingerprint} (llm-pipeline push)"
        info = api.create_commit(repo_id, ops, commit_message=message, repo_type=repo_type, revision=branch)
    changed = info.oid != head
    record_push(artifact.run_dir, artifact.fingerprint, {
        "repo": repo_id, "repo_type": repo_type, "revision": branch, "commit": info.oid,
        "endpoint": public_endpoint, "path": str(artifact.path)})
    log.info("%s %s@%s (commit %s)", "pushed to" if changed else "already up to date:", repo_id, branch, info.oid)
    return f"{repo_id}@{branch}"


def push_stage_outputs(recipe_run_dir: Path, stage: str, settings: PushSettings,
                       endpoint: str | None = None) -> list[str]:
    """Push a finished stage's outputs as `settings` says (the runner calls this for `stages.NAME.push`)."""
    stage_dir = Path(recipe_run_dir) / stage
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise PushError(f"stage {stage!r} has no complete outputs in {stage_dir} to push")
    outputs = settings.outputs or [resolve_artifact(stage_dir).output]
    unknown = [o for o in outputs if o not in (manifest.get("outputs") or [])]
    if unknown:
        raise PushError(f"stages.{stage}.push.outputs: {', '.join(unknown)} not among the stage's outputs "
                        f"({', '.join(manifest.get('outputs') or [])})")
    pushed, used = [], set()
    for output in outputs:
        artifact = resolve_artifact(stage_dir / output)
        repo = settings.repo if artifact.repo_type not in used else f"{settings.repo}-{output}"
        used.add(artifact.repo_type)
        pushed.append(push_artifact(artifact.path, repo, private=settings.private, revision=settings.revision,
                                    endpoint=endpoint, license=settings.license))
    return pushed


def pending_pushes(recipe_run_dir: Path, stage: str, settings: PushSettings, endpoint: str | None = None) -> list[str]:
    """Outputs of a published stage not yet recorded as pushed where `settings` says (for stages already done)."""
    stage_dir = Path(recipe_run_dir) / stage
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return []
    where = _public_endpoint(resolve_endpoint(endpoint))
    pushes = read_pushes(Path(recipe_run_dir))
    outputs = settings.outputs or [resolve_artifact(stage_dir).output]
    branch = settings.revision or "main"
    return [o for o in outputs
            if not ((e := pushes.get(f"{manifest['fingerprint']}:{o}")) and e.get("endpoint") == where
                    and e.get("revision") == branch and e.get("repo", "").startswith(settings.repo))]


# --- command line ----------------------------------------------------------------------------------------------


def add_push_arguments(parser) -> None:
    parser.add_argument("artifact", help="a published output folder (runs/tiny/pretrain/model) or a stage folder")
    parser.add_argument("--repo", required=True, help="hub repo ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to push to (created if missing); default main")
    parser.add_argument("--endpoint", help="hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--license", help="license in the card (default apache-2.0)")
    parser.add_argument("--message", help="commit message")


def cli_push(args) -> int:
    """`python -m pipeline push ...`; 0 on success, 1 with a one-line reason on failure."""
    if not log.handlers:  # our progress lines on stderr; the hub client logs its own warnings
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[push] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        ref = push_artifact(args.artifact, args.repo, private=args.private, revision=args.revision,
                            endpoint=args.endpoint, license=args.license, commit_message=args.message)
    except PushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(ref)
    return 0
