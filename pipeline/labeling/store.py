"""Human feedback: sample responses, label them in a local web page, export reward-stage datasets.

    python -m pipeline label runs/tiny/sft/model --prompts prompts.jsonl --out labels/ --responses 4
    python -m pipeline label recipes/tiny.yaml --prompts prompts.jsonl --out labels/ --labeler ana
    python -m pipeline label --prompts given.jsonl --out labels/          # rows carry their own responses
    python -m pipeline label-export labels/ --out feedback/               # feedback/{rankings,ratings,pairs,sft}
    python -m pipeline label-export labels/ --samples-jsonl samples.jsonl --labels-jsonl labels.jsonl
    python -m pipeline label-import their_labels.jsonl --dir labels/

A session folder holds `samples.jsonl` (one line per prompt: id, prompt, responses; written once) and
`judgements.jsonl`, append-only: one line per saved judgement, flushed and fsynced before the server
answers, so a killed server or browser loses nothing that was acknowledged. The latest judgement of a
labeler on a prompt wins. The export is a published artifact (manifest with stage "label") with one
`datasets` folder per format the reward stage reads, and the corrections as SFT data.
docs/feedback.md describes the page, the formats and the export rules.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

from pipeline.data.preferences import PREFERENCE_FORMATS

SAMPLES = "samples.jsonl"
JUDGEMENTS = "judgements.jsonl"
SESSION = "session.json"
FORMATS = (*PREFERENCE_FORMATS, "sft")  # what an export writes
CORRECTION_PREFERRED = ("all_bad", "always", "never")
EXPORT_VERSION = 1  # bump when the exported rows change for the same judgements
MAX_TEXT = 200_000  # characters of a correction


class LabelError(ValueError):
    """Bad input from a person or a file; printed without a traceback."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --- reading prompts and sessions ---

def read_jsonl(path: Path) -> list[dict]:
    """A user's JSONL file, each bad line named (our own logs are read by pipeline.runner.artifacts.read_jsonl)."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise LabelError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise LabelError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_prompt_rows(path: Path) -> list[dict]:
    """Rows of a JSONL/JSON file, a parquet file or a saved `datasets` folder (its train split, else its only one)."""
    path = Path(path)
    if not path.exists():
        raise LabelError(f"prompts: {path} does not exist")
    if path.is_file() and path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise LabelError(f"prompts: {path} must hold a JSON list of objects")
        return data
    import datasets

    if path.is_file() and path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path)).to_list()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data and len(data) != 1:
                raise LabelError(f"prompts: {path} has splits {list(data)}; expected train or a single split")
            data = data["train"] if "train" in data else next(iter(data.values()))
        return data.to_list()
    raise LabelError(f"prompts: {path} is not a .jsonl/.json/.parquet file or a saved datasets folder")


def row_prompt(row: dict, where: str) -> str:
    """The `prompt` column, or the first user turn of a `messages` column."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    for message in row.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content", ""))
    raise LabelError(f"{where}: no `prompt` column (or `messages` with a user turn); it has {', '.join(row) or 'nothing'}")


def items_from_rows(rows: list[dict], source: str, need_responses: bool) -> list[dict]:
    """Session items {id, prompt, responses|None} from input rows; ids from an `id` column, else s00000, s00001, ..."""
    items, seen = [], set()
    for n, row in enumerate(rows):
        where = f"{source} row {n}"
        prompt = row_prompt(row, where)
        responses = row.get("responses")
        if responses is not None:
            if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses) or len(responses) < 2:
                raise LabelError(f"{where}: `responses` must be a list of at least 2 strings")
        elif need_responses:
            raise LabelError(f"{where}: no `responses` column, and no checkpoint given to sample them")
        item_id = str(row["id"]) if row.get("id") is not None else f"s{n:05d}"
        if item_id in seen:
            raise LabelError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        items.append({"id": item_id, "prompt": prompt, "responses": responses})
    if not items:
        raise LabelError(f"{source}: no rows")
    return items


def write_samples(folder: Path, items: list[dict], session: dict) -> None:
    """The session's prompts and responses, written once and atomically (a half-written folder is no session)."""
    from pipeline.runner.artifacts import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{SAMPLES}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"id": item["id"], "prompt": item["prompt"], "responses": item["responses"]},
                               ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    write_json_atomic(folder / SESSION, {**session, "items": len(items), "created": now_iso()})
    os.replace(tmp, folder / SAMPLES)


def is_session(folder: Path) -> bool:
    return (Path(folder) / SAMPLES).is_file()


# --- judgements ---

def normalize_judgement(raw: dict, k: int) -> dict:
    """A checked judgement {ranks, scores, all_bad, correction} for an item with k responses.

    ranks: one integer per response, 0 = best, equal = tie (stored as dense ranks 0, 1, 1, 2), or null;
    scores: one number (or null) per response, or null; all_bad: bool; correction: text or null.
    """
    if not isinstance(raw, dict):
        raise LabelError("a judgement must be a JSON object")
    ranks = raw.get("ranks")
    if ranks is not None:
        if (not isinstance(ranks, list) or len(ranks) != k
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)):
            raise LabelError(f"ranks: expected {k} non-negative integers (0 = best), got {ranks!r}")
        levels = sorted(set(ranks))
        ranks = [levels.index(r) for r in ranks]
    scores = raw.get("scores")
    if scores is not None:
        if not isinstance(scores, list) or len(scores) != k:
            raise LabelError(f"scores: expected a list of {k} numbers or nulls, got {scores!r}")
        for s in scores:
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
                raise LabelError(f"scores: {s!r} is not a finite number")
        scores = None if all(s is None for s in scores) else [None if s is None else float(s) for s in scores]
    all_bad = raw.get("all_bad", False)
    if not isinstance(all_bad, bool):
        raise LabelError(f"all_bad: expected true or false, got {all_bad!r}")
    correction = raw.get("correction")
    if correction is not None:
        if not isinstance(correction, str):
            raise LabelError("correction: expected text or null")
        if len(correction) > MAX_TEXT:
            raise LabelError(f"correction: longer than {MAX_TEXT} characters")
        correction = correction.strip() or None
    if ranks is None and scores is None and not all_bad and correction is None:
        raise LabelError("empty judgement: give a ranking, a score, 'all bad' or a correction")
    return {"ranks": ranks, "scores": scores, "all_bad": all_bad, "correction": correction}


def check_labeler(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or any(c in name for c in "\n\r\t"):
        raise LabelError(f"labeler: expected a name of 1-100 characters on one line, got {name!r}")
    return name.strip()


class LabelStore:
    """One session folder: its items and the append-only judgement log (safe for threads and processes).

    A write takes an exclusive file lock, drops a torn last line left by a killed writer (never
    acknowledged), appends one line in one write, fsyncs, and only then returns.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if not is_session(self.folder):
            raise LabelError(f"{self.folder} is not a labeling session (no {SAMPLES}); start one with "
                             f"`python -m pipeline label ... --out {self.folder}`")
        self.items = read_jsonl(self.folder / SAMPLES)
        self.index = {item["id"]: n for n, item in enumerate(self.items)}
        self.path = self.folder / JUDGEMENTS
        self._lock = threading.Lock()
        self._offset = 0
        self._latest: dict[tuple[str, str], dict] = {}
        self._count = 0
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.fsync(fd)
            os.close(fd)
            dir_fd = os.open(self.folder, os.O_RDONLY)
            os.fsync(dir_fd)  # the new file's name survives a crash too
            os.close(dir_fd)
        self.refresh()

    def refresh(self) -> None:
        """Read judgements appended since the last read (by this or another process); torn tails are skipped."""
        with self._lock:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():
                if line.strip():
                    self._apply(json.loads(line))
            self._offset += end

    def _apply(self, record: dict) -> None:
        self._latest[(record["id"], record["labeler"])] = record
        self._count += 1

    def add(self, item_id: str, labeler: str, raw: dict, via: str = "web") -> dict:
        return self.add_many([(item_id, labeler, raw)], via)[0]

    def add_many(self, entries: list[tuple[str, str, dict]], via: str) -> list[dict]:
        """Check, append and fsync judgements; returns the stored records (nothing is written if one is bad)."""
        records = []
        for item_id, labeler, raw in entries:
            if item_id not in self.index:
                raise LabelError(f"unknown item id {item_id!r}")
            k = len(self.items[self.index[item_id]]["responses"])
            records.append({"id": item_id, "labeler": check_labeler(labeler), **normalize_judgement(raw, k),
                            "time": now_iso(), "via": via})
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        self.refresh()
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size:
                    tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
                    if not tail.endswith(b"\n"):  # a writer died mid-line: that line was never acknowledged
                        cut = tail.rfind(b"\n")
                        os.ftruncate(fd, size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
                        self._offset = min(self._offset, os.fstat(fd).st_size)
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)  # releases the lock
        self.refresh()
        return records

    def latest(self) -> dict[tuple[str, str], dict]:
        """(item id, labeler) -> that labeler's latest judgement of the item."""
        self.refresh()
        with self._lock:
            return dict(self._latest)

    def judgement(self, item_id: str, labeler: str) -> dict | None:
        return self.latest().get((item_id, labeler))

    def progress(self, labeler: str) -> tuple[int, int]:
        latest = self.latest()
        return sum((item["id"], labeler) in latest for item in self.items), len(self.items)

    def resume_index(self, labeler: str, after: int = -1) -> int | None:
        """The first item (after `after`, wrapping round) this labeler has not judged; None when all are done."""
        latest = self.latest()
        n = len(self.items)
        for step in range(1, n + 1):
            i = (after + step) % n
            if (self.items[i]["id"], labeler) not in latest:
                return i
        return None


def display_order(item_id: str, labeler: str, k: int) -> list[int]:
    """A fixed shuffle per labeler and item: no position bias, and the same order after a reload."""
    def key(i: int) -> str:
        return hashlib.sha256(f"{labeler}\0{item_id}\0{i}".encode()).hexdigest()

    return sorted(range(k), key=key)


# --- from judgements to preferences ---

def effective_ranks(judgement: dict, k: int) -> list[int] | None:
    """The preference order a judgement expresses among its responses: its ranks, else ranks from a full set
    of scores (higher is better), all equal when marked all bad; None when it orders nothing."""
    if judgement["all_bad"]:
        return [0] * k
    if judgement["ranks"] is not None:
        return list(judgement["ranks"])
    scores = judgement["scores"]
    if scores is not None and all(s is not None for s in scores):
        levels = sorted(set(scores), reverse=True)
        return [levels.index(s) for s in scores]
    return None


def preference_ranking(item: dict, judgement: dict, correction_preferred: str) -> tuple[list[str], list[int]] | None:
    """(responses, ranks) a judgement contributes to rankings/pairs, or None when it prefers nothing.

    The correction is ranked above every response when the item is marked all bad (default), also
    otherwise with "always", never with "never". All bad puts all sampled responses on one rank.
    """
    responses = list(item["responses"])
    ranks = effective_ranks(judgement, len(responses))
    correction = judgement["correction"]
    if correction is not None and correction_preferred != "never" and (judgement["all_bad"] or correction_preferred == "always"):
        base = ranks if ranks is not None else [0] * len(responses)
        responses, ranks = [correction] + responses, [0] + [r + 1 for r in base]
    if ranks is None or len(set(ranks)) < 2:
        return None
    return responses, ranks


def judgement_rows(item: dict, judgement: dict, correction_preferred: str) -> dict[str, list[dict]]:
    """The rows one judgement adds to each exported format."""
    from pipeline.data.preferences import ranking_pairs

    who = {"id": item["id"], "labeler": judgement["labeler"]}
    prompt = item["prompt"]
    rows: dict[str, list[dict]] = {name: [] for name in FORMATS}
    ranking = preference_ranking(item, judgement, correction_preferred)
    if ranking is not None:
        responses, ranks = ranking
        rows["rankings"].append({**who, "prompt": prompt, "responses": responses, "ranks": ranks})
        for i, j in sorted(ranking_pairs(ranks), key=lambda p: (ranks[p[0]], p[0], ranks[p[1]], p[1])):
            rows["pairs"].append({**who, "prompt": prompt, "chosen": responses[i], "rejected": responses[j],
                                  "margin": float(ranks[j] - ranks[i])})
    if judgement["scores"] is not None and not judgement["all_bad"]:
        for response, score in zip(item["responses"], judgement["scores"]):
            if score is not None:
                rows["ratings"].append({**who, "prompt": prompt, "response": response, "rating": float(score)})
    if judgement["correction"] is not None:
        rows["sft"].append({**who, "messages": [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": judgement["correction"]}]})
    return rows


# --- agreement between labelers ---

def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two rankings (ties allowed); None when either ranks everything equal."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else None


def agreement(items: list[dict], latest: dict[tuple[str, str], dict]) -> dict:
    """Agreement of every two labelers on the prompts both ordered.

    agreement_rate: of the response pairs both labelers prefer one way (no tie on either side), the
    fraction they prefer the same way; kendall_tau: mean tau-b of their two orders over shared prompts.
    """
    orders: dict[str, dict[str, list[int]]] = {}
    by_id = {item["id"]: item for item in items}
    for (item_id, labeler), judgement in latest.items():
        ranks = effective_ranks(judgement, len(by_id[item_id]["responses"]))
        if ranks is not None:
            orders.setdefault(labeler, {})[item_id] = ranks
    out = []
    total_agree = total_compared = 0
    all_taus: list[float] = []
    for a, b in combinations(sorted(orders), 2):
        shared = sorted(set(orders[a]) & set(orders[b]))
        agree = compared = 0
        taus = []
        for item_id in shared:
            x, y = orders[a][item_id], orders[b][item_id]
            for i, j in combinations(range(len(x)), 2):
                sx, sy = x[i] - x[j], y[i] - y[j]
                if sx and sy:
                    compared += 1
                    agree += (sx > 0) == (sy > 0)
            if (tau := kendall_tau_b(x, y)) is not None:
                taus.append(tau)
        total_agree += agree
        total_compared += compared
        all_taus += taus
        out.append({"labelers": [a, b], "shared_prompts": len(shared), "compared_pairs": compared,
                    "agreement_rate": agree / compared if compared else None,
                    "kendall_tau": sum(taus) / len(taus) if taus else None})
    return {"labelers": sorted(orders), "pairs": out,
            "overall": {"compared_pairs": total_compared,
                        "agreement_rate": total_agree / total_compared if total_compared else None,
                        "kendall_tau": sum(all_taus) / len(all_taus) if all_taus else None}}


# --- export ---

def split_rows(rows: list[dict], validation_fraction: float) -> dict[str, list[dict]]:
    """train/validation by prompt (all rows of a prompt on one side), chosen by a hash of the item id."""
    ids = sorted({r["id"] for r in rows}, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    n_val = 0
    if validation_fraction > 0 and len(ids) >= 2:
        n_val = min(len(ids) - 1, max(1, round(validation_fraction * len(ids))))
    held_out = set(ids[:n_val])
    splits = {"train": [r for r in rows if r["id"] not in held_out]}
    if held_out:
        splits["validation"] = [r for r in rows if r["id"] in held_out]
    return splits


def final_judgements(store: LabelStore) -> list[dict]:
    """Each labeler's latest judgement per item, in item order then labeler order."""
    latest = store.latest()
    return [latest[key] for key in sorted(latest, key=lambda key: (store.index[key[0]], key[1]))]


def judgements_fingerprint(store: LabelStore, judgements: list[dict]) -> str:
    from pipeline.runner.artifacts import fingerprint

    content = [{k: j[k] for k in ("id", "labeler", "ranks", "scores", "all_bad", "correction")} for j in judgements]
    samples = hashlib.sha256((store.folder / SAMPLES).read_bytes()).hexdigest()
    return fingerprint({"samples": samples, "judgements": content})


def export(folder: Path, out: Path, validation_fraction: float = 0.1, correction_preferred: str = "all_bad") -> dict:
    """Publish OUT/{rankings,ratings,pairs,sft} (saved `datasets` folders; a format without rows is left
    out) and OUT/judgements.jsonl with a manifest (stage "label"); returns the manifest."""
    import datasets

    from pipeline.runner import artifacts

    if correction_preferred not in CORRECTION_PREFERRED:
        raise LabelError(f"correction_preferred: expected one of {', '.join(CORRECTION_PREFERRED)}")
    if not 0 <= validation_fraction < 1:
        raise LabelError(f"validation_fraction: expected a number in [0, 1), got {validation_fraction}")
    started = time.time()
    store = LabelStore(folder)
    judgements = final_judgements(store)
    if not judgements:
        raise LabelError(f"{folder}: no judgements to export yet")
    rows: dict[str, list[dict]] = {name: [] for name in FORMATS}
    for judgement in judgements:
        for name, new in judgement_rows(store.items[store.index[judgement["id"]]], judgement, correction_preferred).items():
            rows[name] += new
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    counts = {}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a few rows: no bar per shard
    try:
        for name in FORMATS:
            if not rows[name]:
                continue
            splits = split_rows(rows[name], validation_fraction)
            datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}).save_to_disk(str(staging / name))
            counts[name] = {s: len(r) for s, r in splits.items()}
    finally:
        if bars:
            datasets.enable_progress_bars()
    with open(staging / JUDGEMENTS, "w", encoding="utf-8") as f:
        for judgement in judgements:
            f.write(json.dumps(judgement, ensure_ascii=False) + "\n")
    per_labeler: dict[str, dict[str, int]] = {}
    for j in judgements:
        mine = per_labeler.setdefault(j["labeler"], {"judgements": 0, "ranked": 0, "scored": 0, "all_bad": 0, "corrections": 0})
        mine["judgements"] += 1
        mine["ranked"] += j["ranks"] is not None
        mine["scored"] += j["scores"] is not None
        mine["all_bad"] += j["all_bad"]
        mine["corrections"] += j["correction"] is not None
    settings = {"validation_fraction": validation_fraction, "correction_preferred": correction_preferred}
    session_fp = judgements_fingerprint(store, judgements)
    metrics = {"items": len(store.items), "items_judged": len({j["id"] for j in judgements}),
               "judgements": len(judgements), "rows": counts, "labelers": per_labeler,
               "no_preference": sum(preference_ranking(store.items[store.index[j["id"]]], j, correction_preferred) is None
                                    for j in judgements),
               "agreement": agreement(store.items, store.latest())}
    manifest = artifacts.make_manifest(
        stage="label",
        fingerprint=artifacts.fingerprint({"stage": "label", "version": EXPORT_VERSION, "judgements": session_fp,
                                           "settings": settings}),
        inputs={"session": {"spec": str(store.folder), "kind": "path", "fingerprint": session_fp,
                            "path": str(store.folder.resolve())}},
        outputs=sorted(counts), settings=settings, metrics=metrics, started=started)
    artifacts.publish(staging, out, manifest)
    return {**manifest, "complete": True}


# --- interoperability: samples out, labels in ---

def export_samples_jsonl(folder: Path, path: Path) -> int:
    """One line per prompt {id, prompt, responses}: what a dedicated labeling tool needs."""
    store = LabelStore(folder)
    with open(path, "w", encoding="utf-8") as f:
        for item in store.items:
            f.write(json.dumps({"id": item["id"], "prompt": item["prompt"], "responses": item["responses"]},
                               ensure_ascii=False) + "\n")
    return len(store.items)


def export_labels_jsonl(folder: Path, path: Path) -> int:
    """Every labeler's latest judgement, one per line, with its prompt and responses (the import format)."""
    store = LabelStore(folder)
    judgements = final_judgements(store)
    with open(path, "w", encoding="utf-8") as f:
        for j in judgements:
            item = store.items[store.index[j["id"]]]
            f.write(json.dumps({"id": j["id"], "labeler": j["labeler"], "prompt": item["prompt"],
                                "responses": item["responses"], "ranks": j["ranks"], "scores": j["scores"],
                                "all_bad": j["all_bad"], "correction": j["correction"]}, ensure_ascii=False) + "\n")
    return len(judgements)


def import_labels(path: Path, folder: Path, labeler: str | None = None) -> int:
    """Append the judgements of a labels JSONL file to a session (created from the file's prompts and
    responses when `folder` holds none). Lines name their item by `id`; a line that also carries
    `prompt`/`responses` must match that item. All lines are checked before anything is written."""
    path, folder = Path(path), Path(folder)
    lines = read_jsonl(path)
    if not lines:
        raise LabelError(f"{path}: no labels")
    if not is_session(folder):
        items, seen = [], {}
        for n, line in enumerate(lines, 1):
            if not isinstance(line.get("prompt"), str) or not isinstance(line.get("responses"), list):
                raise LabelError(f"{path}:{n}: {folder} holds no session yet, so every line needs prompt and responses")
            item_id = str(line.get("id") or f"s{len(items):05d}")
            line["id"] = item_id
            if item_id in seen:
                if (seen[item_id]["prompt"], seen[item_id]["responses"]) != (line["prompt"], line["responses"]):
                    raise LabelError(f"{path}:{n}: id {item_id!r} appears with a different prompt or responses")
                continue
            seen[item_id] = line
            items.append({"id": item_id, "prompt": line["prompt"], "responses": line["responses"]})
        items_from_rows(items, str(path), need_responses=True)  # same checks as any session
        write_samples(folder, items, {"source": {"kind": "import", "path": str(path.resolve())}})
    store = LabelStore(folder)
    entries = []
    for n, line in enumerate(lines, 1):
        item_id = line.get("id")
        if item_id is None or str(item_id) not in store.index:
            raise LabelError(f"{path}:{n}: id {item_id!r} is not an item of {folder} (export its samples with "
                             f"`python -m pipeline label-export {folder} --samples-jsonl FILE`)")
        item = store.items[store.index[str(item_id)]]
        for key in ("prompt", "responses"):
            if key in line and line[key] != item[key]:
                raise LabelError(f"{path}:{n}: {key} differs from item {item_id!r} of {folder}")
        who = line.get("labeler", labeler)
        if who is None:
            raise LabelError(f"{path}:{n}: no labeler (give each line one, or pass --labeler NAME)")
        try:
            check_labeler(who)
            normalize_judgement(line, len(item["responses"]))
        except LabelError as e:
            raise LabelError(f"{path}:{n}: {e}") from None
        entries.append((str(item_id), who, line))
    store.add_many(entries, via=f"import:{path.name}")
    return len(entries)


# --- sampling ---

def resolve_model(source: str) -> Path:
    """A checkpoint folder, or a recipe: its published `sft` model, else its `ppo` model."""
    from pipeline.runner.artifacts import read_manifest

    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LabelError(f"{path} holds no checkpoint (config.json missing)")
        return path
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from pipeline.recipe.schema import load_recipe

        recipe = load_recipe(path)
        for stage in ("sft", "ppo"):
            if stage in recipe.settings and read_manifest(recipe.stage_dir(stage)) is not None:
                model = recipe.stage_dir(stage) / "model"
                if (model / "config.json").exists():
                    return model
        raise LabelError(f"recipe {path}: neither its sft nor its ppo stage has published a model yet in "
                         f"{recipe.run_path}; run `python -m pipeline run {path} --only sft` first")
    raise LabelError(f"{source}: not a checkpoint folder or a recipe file")


def sample_responses(model_dir: Path, prompts: list[str], k: int, max_new_tokens: int = 128,
                     temperature: float = 1.0, top_p: float = 0.95, seed: int = 0) -> list[list[str]]:
    """K sampled responses per prompt, through the checkpoint's chat template, stopping at the end of the turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.rl.rollout import generate_answers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    limit = getattr(model.config, "max_position_embeddings", None)
    torch.manual_seed(seed)
    out = []
    for n, prompt in enumerate(prompts):
        out += generate_answers(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, num_return_sequences=k,
                                max_prompt_tokens=max(1, limit - max_new_tokens) if limit else None,
                                do_sample=True, temperature=temperature, top_p=top_p)
        print(f"sampled {n + 1}/{len(prompts)}", file=sys.stderr, flush=True)
    return out


def start_session(folder: Path, prompts: Path | None, source: str | None, k: int, **sampling) -> LabelStore:
    """Open the session in `folder`, creating it from `prompts` first (sampling responses where rows have none)."""
    folder = Path(folder)
    if is_session(folder):
        if prompts is not None:
            print(f"{folder} already holds a session; resuming it (--prompts ignored)", file=sys.stderr)
        return LabelStore(folder)
    if prompts is None:
        raise LabelError(f"{folder} holds no session yet: give --prompts DATA")
    rows = read_prompt_rows(Path(prompts))
    items = items_from_rows(rows, str(prompts), need_responses=source is None)
    info: dict[str, Any] = {"prompts": str(Path(prompts).resolve())}
    todo = [item for item in items if item["responses"] is None]
    if source is not None and k < 2:
        raise LabelError(f"--responses: need at least 2 responses per prompt to compare, got {k}")
    if todo:
        model = resolve_model(source)
        info["source"] = {"kind": "checkpoint", "path": str(model.resolve()), "responses": k, **sampling}
        for item, responses in zip(todo, sample_responses(model, [i["prompt"] for i in todo], k, **sampling)):
            item["responses"] = responses
    else:
        info["source"] = {"kind": "given"}
    write_samples(folder, items, info)
    return LabelStore(folder)
