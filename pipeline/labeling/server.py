"""The labeling page's HTTP server: stdlib ThreadingHTTPServer, one static page, a small JSON API.

    python -m pipeline label --prompts given.jsonl --out labels/ --port 8765   # see pipeline/labeling/store.py

Safe by default: it binds 127.0.0.1 only, answers only requests whose Host is 127.0.0.1/localhost on
its port (no DNS rebinding), takes POSTs only as application/json from its own origin, and sends a
Content-Security-Policy that allows scripts and styles from the page's own files only (no inline
script, no eval); the page puts every prompt and response into the DOM with textContent.

API (JSON):
  GET  /api/session       {labeler, total, done, resume}                 resume: first item not yet judged
  GET  /api/item/N        {index, id, prompt, responses, order, judgement}  order: display order of responses
  POST /api/judgement     {index, ranks, scores, all_bad, correction} -> appended and fsynced, then
                          {saved, done, total, next}
  POST /api/export        publishes the export folder -> {path, metrics}
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.labeling.store import LabelError, LabelStore, display_order, export

log = logging.getLogger("pipeline")
HOST = "127.0.0.1"
MAX_BODY = 1 << 20
STATIC = {"/": "index.html", "/index.html": "index.html", "/static/app.js": "app.js", "/static/app.css": "app.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class LabelingApp:
    """What the handler serves: one session, one labeler, an export folder."""

    def __init__(self, store: LabelStore, labeler: str, export_dir: Path):
        self.store = store
        self.labeler = labeler
        self.export_dir = Path(export_dir)
        self.export_lock = threading.Lock()

    def session(self) -> dict:
        done, total = self.store.progress(self.labeler)
        return {"labeler": self.labeler, "total": total, "done": done,
                "resume": self.store.resume_index(self.labeler), "folder": str(self.store.folder)}

    def item(self, index: int) -> dict:
        if not 0 <= index < len(self.store.items):
            raise LookupError(f"no item {index}")
        item = self.store.items[index]
        judgement = self.store.judgement(item["id"], self.labeler)
        return {"index": index, "id": item["id"], "prompt": item["prompt"], "responses": item["responses"],
                "order": display_order(item["id"], self.labeler, len(item["responses"])), "judgement": judgement}

    def save(self, body: dict) -> dict:
        index = body.get("index")
        if not isinstance(index, int) or not 0 <= index < len(self.store.items):
            raise LabelError(f"index: expected an item number 0..{len(self.store.items) - 1}, got {index!r}")
        record = self.store.add(self.store.items[index]["id"], self.labeler, body)  # durable before we answer
        done, total = self.store.progress(self.labeler)
        return {"saved": record, "done": done, "total": total, "next": self.store.resume_index(self.labeler, index)}

    def export(self) -> dict:
        with self.export_lock:
            manifest = export(self.store.folder, self.export_dir)
        return {"path": str(self.export_dir), "metrics": manifest["metrics"]}


class Handler(BaseHTTPRequestHandler):
    server_version = "labeling"
    sys_version = ""

    @property
    def app(self) -> LabelingApp:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)

    def send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, data) -> None:
        self.send(status, json.dumps(data, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def host_ok(self) -> bool:
        port = self.server.server_address[1]
        return self.headers.get("Host", "") in (f"{HOST}:{port}", f"localhost:{port}")

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if not self.host_ok():
            return self.send_json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        path = urlsplit(self.path).path
        try:
            if path in STATIC:
                name = STATIC[path]
                body = resources.files("pipeline.labeling").joinpath("static", name).read_bytes()
                return self.send(HTTPStatus.OK, body, CONTENT_TYPES[Path(name).suffix])
            if path == "/favicon.ico":
                return self.send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            if path == "/api/session":
                return self.send_json(HTTPStatus.OK, self.app.session())
            if path.startswith("/api/item/") and path[len("/api/item/"):].isdigit():
                return self.send_json(HTTPStatus.OK, self.app.item(int(path[len("/api/item/"):])))
        except LookupError as e:
            return self.send_json(HTTPStatus.NOT_FOUND, {"error": str(e)})
        self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}"})

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        port = self.server.server_address[1]
        origin = self.headers.get("Origin")
        if not self.host_ok() or (origin is not None and origin not in (f"http://{HOST}:{port}", f"http://localhost:{port}")):
            return self.send_json(HTTPStatus.FORBIDDEN, {"error": "cross-origin request refused"})
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self.send_json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self.send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request too large"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": "body is not JSON"})
        path = urlsplit(self.path).path
        try:
            if path == "/api/judgement":
                return self.send_json(HTTPStatus.OK, self.app.save(body))
            if path == "/api/export":
                return self.send_json(HTTPStatus.OK, self.app.export())
        except LabelError as e:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except OSError as e:  # a full disk, a read-only folder: the judgement was not saved; say so
            log.exception("write failed")
            return self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"not saved: {e}"})
        self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path}"})


def make_server(store: LabelStore, labeler: str, port: int = 0, export_dir: Path | None = None) -> ThreadingHTTPServer:
    """A server bound to 127.0.0.1:port (0 = a free port); call serve_forever() on it."""
    server = ThreadingHTTPServer((HOST, port), Handler)
    server.daemon_threads = True
    server.app = LabelingApp(store, labeler, export_dir or store.folder / "export")  # type: ignore[attr-defined]
    return server


def serve(store: LabelStore, labeler: str, port: int = 0, export_dir: Path | None = None) -> None:
    """Serve until interrupted; prints the page's URL (every judgement is on disk when it is acknowledged)."""
    try:
        server = make_server(store, labeler, port, export_dir)
    except OSError as e:
        raise LabelError(f"cannot listen on {HOST}:{port}: {e.strerror}") from None
    done, total = store.progress(labeler)
    print(f"labeling {total} prompts in {store.folder} as {labeler!r} ({done} done)", flush=True)
    print(f"open http://{HOST}:{server.server_address[1]}/  (Ctrl+C stops; you can resume any time)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped; every saved judgement is on disk", file=sys.stderr)
    finally:
        server.server_close()
