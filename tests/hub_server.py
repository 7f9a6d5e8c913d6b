"""A small in-memory Hugging Face Hub for tests: the subset of the Hub HTTP API that huggingface_hub 2.4 uses
to create repos, upload (preupload, LFS batch/PUT/verify, NDJSON commit), list and download files.

    server = HubServer(tokens={"hf_test_token": "alice"}).start()   # http://127.0.0.1:PORT
    api = HfApi(endpoint=server.url, token="hf_test_token")          # with HF_HUB_DISABLE_XET=1
    ...
    server.stop()

Run alone (`python tests/hub_server.py [--port N] [--token TOKEN=USER ...]`) for manual checks. It is not a Hub:
no git, no pull requests, no tags, no xet; access rules are "a valid token may use its own namespace and
its orgs"; private repos answer like the real Hub (401 RepoNotFound without a token, 404 with a token that
has no access, 401 "Invalid credentials" for an unknown token). Everything lives in memory.

Test hooks: `counts` (Counter of lfs_put, lfs_batch, commit, preupload, ...), `log` (method, path, status),
`hold_lfs_puts_after(n)` (the (n+1)th and later LFS PUTs hang until `release()`: kill a client mid-push),
`drop_lfs_put(k)` (close the connection without an answer on the k-th PUT: the client retries).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# what the Hub's default .gitattributes sends to LFS (plus anything >= 10 MB)
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".onnx",
                ".arrow", ".parquet", ".npy", ".npz", ".zip", ".gz", ".tar", ".zst", ".model", ".tflite", ".ot")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """What the Hub reports as the file's oid in preupload (sha256 for LFS, git sha1 otherwise)."""
        return self.sha256 if self.lfs else git_blob_sha1(self.data)

    @property
    def blob_id(self) -> str:
        """The git blob id (of the pointer file for LFS files), as in tree listings."""
        return git_blob_sha1(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)


@dataclass
class Commit:
    oid: str
    files: dict[str, Blob]
    message: str
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_type: str  # model | dataset
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # uploaded LFS objects (committed or not), by sha256

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None):
        self.tokens = dict(tokens or {"hf_test_token": "alice"})  # token -> user
        self.orgs = dict(orgs or {})  # org -> member users
        self.repos: dict[tuple[str, str], Repo] = {}
        self.counts: Counter = Counter()
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self._hold_after: int | None = None
        self._held = threading.Event()
        self._drop_puts: set[int] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._commit_counter = 0

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self, port: int = 0) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = _QuietServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # --- fault injection ----------------------------------------------------------------------------------

    def hold_lfs_puts_after(self, n: int) -> None:
        """The first n LFS PUTs to arrive succeed; later ones hang (until `release`) without storing anything."""
        self._hold_after = n
        self._held.clear()

    def release(self) -> None:
        self._hold_after = None
        self._held.set()

    def drop_lfs_put(self, k: int) -> None:
        """Close the connection without answering on the k-th LFS PUT (counted from 1 over the server's life)."""
        self._drop_puts.add(k)

    # --- helpers used by tests ------------------------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        return {path: blob.data for path, blob in commit.files.items()}

    # --- state ------------------------------------------------------------------------------------------

    def new_commit(self, repo: Repo, files: dict[str, Blob], message: str, parent: str | None) -> Commit:
        self._commit_counter += 1
        oid = hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}/{self._commit_counter}/{time.time_ns()}".encode()).hexdigest()
        date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        commit = Commit(oid, files, message, parent, date)
        repo.commits[oid] = commit
        return commit


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # clients killed mid-request are expected here
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    # --- plumbing ---------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and self.command != "HEAD":
            self.wfile.write(body)
        self.hub.log.append((self.command, self.path, status))

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, e: HttpError) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._json(e.status, {"error": e.message}, headers)

    def _user(self) -> str | None:
        """The token's user; None without a token; 401 for an unknown token (like the Hub)."""
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        user = self.hub.tokens.get(auth[7:].strip())
        if user is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or user in self.hub.orgs.get(namespace, []))

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get((repo_type, repo_id))
        visible = repo is not None and (not repo.private or self._can_write(user, repo.namespace))
        if not visible:
            status = 401 if user is None else 404
            raise HttpError(status, "Repository not found", "RepoNotFound")
        if write and not self._can_write(user, repo.namespace):
            raise HttpError(403 if user else 401, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        try:
            body = self._body() if method in ("POST", "PUT") else b""
            with self.hub.lock:
                self.hub.counts[f"{method} {parts[0] if parts else ''}"] += 1
            self._route(method, parts, query, body)
        except HttpError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        if self.path.startswith("/lfs-upload/"):
            return self._lfs_put()
        self._dispatch("PUT")

    # --- routes -----------------------------------------------------------------------------------------

    def _route(self, method: str, p: list[str], query: dict, body: bytes) -> None:
        hub = self.hub
        if method == "GET" and p == ["api", "whoami-v2"]:
            user = self._user()
            if user is None:
                raise HttpError(401, "Invalid username or password.")
            orgs = [{"name": o, "type": "org"} for o, members in hub.orgs.items() if user in members]
            return self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": orgs,
                                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})
        if method == "POST" and p == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and p == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body or b"{}"))
        # /api/{models,datasets}/NS/NAME[/...]
        if len(p) >= 4 and p[0] == "api" and p[1] in ("models", "datasets"):
            repo_type, repo_id, rest = p[1][:-1], f"{p[2]}/{p[3]}", p[4:]
            return self._api_repo(method, repo_type, repo_id, rest, query, body)
        # LFS batch: /[datasets/]NS/NAME.git/info/lfs/objects/batch
        lfs = re.match(r"^/(datasets/)?([^/]+)/([^/]+)\.git/info/lfs/objects/(batch|verify)$", urlsplit(self.path).path)
        if lfs and method == "POST":
            repo_type = "dataset" if lfs.group(1) else "model"
            return self._lfs_batch(repo_type, f"{lfs.group(2)}/{lfs.group(3)}", lfs.group(4), json.loads(body or b"{}"))
        # downloads: /[datasets/]NS/NAME/resolve/REV/PATH
        if method in ("GET", "HEAD"):
            q = p[1:] if p and p[0] == "datasets" else p
            if len(q) >= 5 and q[2] == "resolve":
                repo_type = "dataset" if p[0] == "datasets" else "model"
                return self._resolve(method, repo_type, f"{q[0]}/{q[1]}", q[3], "/".join(q[4:]))
        raise HttpError(404, f"no route for {method} {self.path}")

    def _create_repo(self, payload: dict) -> None:
        user = self._user()
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if user is None:
            raise HttpError(401, "You must be authenticated to create a repo")
        if repo_type not in ("model", "dataset"):
            raise HttpError(400, f"repo type {repo_type} is not supported by this test server")
        if not self._can_write(user, namespace):
            raise HttpError(403, f"You don't have the rights to create a repo under the namespace {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        prefix = "" if repo_type == "model" else "datasets/"
        repo_url = f"{self.hub.url}/{prefix}{repo_id}"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:
                return self._json(409, {"error": "You already created this repo", "url": repo_url},
                                  {"X-Error-Message": "You already created this repo"})
            repo = Repo(repo_type, repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            commit = self.hub.new_commit(repo, {".gitattributes": Blob(GITATTRIBUTES, False)}, "initial commit", None)
            repo.branches["main"] = commit.oid
            self.hub.repos[(repo_type, repo_id)] = repo
            self.hub.counts["repo_created"] += 1
        self._json(200, {"url": repo_url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml

        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        try:
            if match is not None and not isinstance(yaml.safe_load(match.group(1)) or {}, dict):
                raise ValueError("metadata is not a mapping")
        except (yaml.YAMLError, ValueError) as e:
            return self._json(400, {"errors": [{"message": str(e)}]})
        self._json(200, {"errors": [], "warnings": []})

    def _api_repo(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict, body: bytes) -> None:
        hub = self.hub
        if method == "GET" and (not rest or rest[0] == "revision"):
            repo = self._repo(repo_type, repo_id)
            commit = self._commit(repo, rest[1] if len(rest) > 1 else "main")
            siblings = [{"rfilename": path, "size": len(b.data), "blobId": b.blob_id,
                         **({"lfs": {"sha256": b.sha256, "size": len(b.data), "pointerSize": 134}} if b.lfs else {})}
                        for path, b in sorted(commit.files.items())]
            return self._json(200, {"id": repo_id, "_id": repo_id, "author": repo.namespace, "sha": commit.oid,
                                    "private": repo.private, "disabled": False, "gated": False,
                                    "lastModified": commit.date, "createdAt": commit.date, "siblings": siblings,
                                    "tags": [], "downloads": 0, "likes": 0})
        if method == "GET" and rest == ["refs"]:
            repo = self._repo(repo_type, repo_id)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid in sorted(repo.branches.items())]
            return self._json(200, {"branches": branches, "converts": [], "tags": []})
        if method == "POST" and len(rest) >= 2 and rest[0] == "branch":
            repo = self._repo(repo_type, repo_id, write=True)
            branch = "/".join(rest[1:])
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            with hub.lock:
                if branch in repo.branches:
                    raise HttpError(409, f"Reference already exists: refs/heads/{branch}")
                repo.branches[branch] = self._commit(repo, start).oid
            return self._json(200, {})
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            repo = self._repo(repo_type, repo_id, write=True)
            commit = self._commit(repo, rest[1])
            hub.counts["preupload"] += 1
            files = []
            for f in json.loads(body)["files"]:
                existing = commit.files.get(f["path"])
                lfs = (existing.lfs if existing is not None else
                       f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                       or b"\0" in base64.b64decode(f.get("sample") or ""))
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": existing.oid if existing is not None else None})
            return self._json(200, {"files": files, "commitOid": commit.oid})
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            return self._create_commit(repo_type, repo_id, rest[1], body)
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            repo = self._repo(repo_type, repo_id)
            commit = self._commit(repo, rest[1])
            recursive = (query.get("recursive") or ["false"])[0].lower() in ("true", "1")
            entries = _tree(commit, "/".join(rest[2:]), recursive)
            if entries is None:
                raise HttpError(404, f"{'/'.join(rest[2:])} does not exist", "EntryNotFound")
            return self._json(200, entries)
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            repo = self._repo(repo_type, repo_id)
            commit = self._commit(repo, rest[1])
            form = parse_qs(body.decode())
            wanted = form.get("paths", [])
            out = []
            for path in wanted:
                path = path.strip("/")
                if path in commit.files:
                    out.append(_file_entry(path, commit.files[path]))
                elif any(f.startswith(path + "/") for f in commit.files):
                    out.append(_dir_entry(path))
            return self._json(200, out)
        raise HttpError(404, f"no route for {method} {self.path}")

    def _create_commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        hub = self.hub
        repo = self._repo(repo_type, repo_id, write=True)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with hub.lock:
            if revision not in repo.branches:
                raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            files = dict(head.files)
            summary = ""
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                    parent = value.get("parentCommit")
                    if parent and not head.oid.startswith(parent):
                        raise HttpError(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                    files[value["path"]] = Blob(data, False)
                elif key == "lfsFile":
                    data = repo.lfs.get(value["oid"])
                    if data is None:
                        raise HttpError(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    files[value["path"]] = Blob(data, True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HttpError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [f for f in files if f.startswith(prefix)]:
                        del files[path]
                else:
                    raise HttpError(400, f"unknown commit operation {key}")
            commit = hub.new_commit(repo, files, summary, head.oid)
            repo.branches[revision] = commit.oid
            hub.counts["commit"] += 1
        prefix = "" if repo_type == "model" else "datasets/"
        self._json(200, {"success": True, "commitOid": commit.oid, "commitMessage": summary,
                         "commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{commit.oid}", "pullRequestUrl": None})

    def _lfs_batch(self, repo_type: str, repo_id: str, action: str, payload: dict) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if action == "verify":
            ok = payload.get("oid") in repo.lfs and len(repo.lfs[payload["oid"]]) == payload.get("size")
            return self._json(200 if ok else 404, {} if ok else {"message": "object not found"})
        self.hub.counts["lfs_batch"] += 1
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            if oid in repo.lfs:  # already there: no actions, the client skips the upload
                objects.append({"oid": oid, "size": size})
                continue
            href = f"{self.hub.url}/lfs-upload/{repo_type}/{repo_id}/{oid}/{size}"
            prefix = "" if repo_type == "model" else "datasets/"
            verify = f"{self.hub.url}/{prefix}{repo_id}.git/info/lfs/objects/verify"
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": {"href": href, "header": {}}, "verify": {"href": verify, "header": {}}}})
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self) -> None:
        hub = self.hub
        _, _, repo_type, ns, name, oid, size = self.path.split("/")[:7]
        with hub.lock:
            hub.counts["lfs_put_started"] += 1
            number = hub.counts["lfs_put_started"]
            hold = hub._hold_after is not None and number > hub._hold_after
            if hold:
                hub.counts["lfs_put_held"] += 1
        if number in hub._drop_puts:
            self._body()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if hold:  # hang before reading: the client sits in its upload until it is killed or we release
            hub._held.wait(timeout=120)
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid or len(data) != int(size):
            return self._json(400, {"error": "content does not match oid/size"})
        with hub.lock:
            hub.repos[(repo_type, f"{ns}/{name}")].lfs[oid] = data
            hub.counts["lfs_put"] += 1
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HttpError(404, f"Entry not found: {path}", "EntryNotFound")
        self.hub.counts["download" if method == "GET" else "head"] += 1
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid,
                   "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        data, status = blob.data, 200
        match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, head=method == "HEAD")


def _file_entry(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "oid": blob.blob_id, "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(lfs_pointer(blob.sha256, len(blob.data)))}
    return entry


def _dir_entry(path: str) -> dict:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}


def _tree(commit: Commit, base: str, recursive: bool) -> list[dict] | None:
    base = base.strip("/")
    prefix = f"{base}/" if base else ""
    if base and not any(f.startswith(prefix) for f in commit.files):
        return None
    entries, dirs = [], set()
    for path in sorted(commit.files):
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix):].split("/")
        for i in range(1, len(rel)):  # the folders on the way
            d = prefix + "/".join(rel[:i])
            if (recursive or i == 1) and d not in dirs:
                dirs.add(d)
                entries.append(_dir_entry(d))
        if recursive or len(rel) == 1:
            entries.append(_file_entry(path, commit.files[path]))
    return entries


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the in-memory test hub.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", action="append", default=[], help="TOKEN=USER (repeatable)")
    args = parser.parse_args()
    tokens = dict(t.split("=", 1) for t in args.token) or None
    server = HubServer(tokens).start(args.port)
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
