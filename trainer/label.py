"""`anyid-rt label CANDIDATES_DIR`: the two-track labelling page of AnyID's preference data (section 4.4,
appendix F, Figures 10-11), served on this machine.

    anyid-rt label runs/candidates                  (http://127.0.0.1:8765/; --port P, --host ADDR)
    anyid-rt label runs/candidates --track prompt --only-needed --annotator alice

Each matchup of the folder (`candidates.py`) is judged on two tracks, one after the other, as the paper's two
modes: identity fidelity (every clip of the ID group is shown, the prompt is not: it would distract) and
prompt controllability (the primary reference and the prompt). Both candidates play side by side in sync.
Keys: 1 left is better, 2 right is better, 0 tie; u or Backspace undoes the last judgement; space plays or
pauses both. The sides are shuffled per task (a fixed hash), so a habit of pressing 1 does not become a
preference.

Judgements are appended to CANDIDATES_DIR/labels.jsonl (`LabelLog`): one record per judgement, and one per
undo naming the judgement it takes back; nothing is rewritten (a record cut short by a crash is dropped), and a
reload or a restart resumes at the first task without a judgement. Every action reads the file first, so two
pages on the two tracks (`--track identity`, `--track prompt`) can share a folder; undo takes back the latest
judgement on the page's own tasks. After every change
pairs.jsonl is rewritten (atomically) from the human labels and the automatic verdicts (`merge_pairs`: human
labels win per track), so `anyid-rt train dpo` with `pairs = "CANDIDATES_DIR/pairs.jsonl"` reads it as is.

The server is the standard library's ThreadingHTTPServer, bound to 127.0.0.1 unless --host says otherwise; it
serves the page (label_page.html), a small JSON API (GET /api/state, POST /api/label, POST /api/undo) and the
folder's images and videos (only files inside the folder, with byte ranges for seeking). A folder that does
not read gets an error page that says why; it is read again on every page load.
"""
from __future__ import annotations

import hashlib
import html
import json
import mimetypes
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .candidates import AXES, LABELS, PAIRS, CandidatesFolder, Matchup, merge_pairs

PAGE = Path(__file__).with_name("label_page.html")
CHOICES = {"a": 1, "b": -1, "tie": 0}
TRACKS = ("both", "identity", "prompt")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LabelError(ValueError):
    """A labels file or a request that cannot be used; the message says which line or field."""


@dataclass(frozen=True)
class Judgement:
    """One human label, as logged in labels.jsonl."""

    matchup: str  # Matchup.id
    axis: str  # "identity" or "prompt"
    choice: str  # "a", "b" or "tie"
    stamp: str  # the matchup's stamp when labelled: a label of videos since regenerated no longer counts


def _parse(raw: str, where: str) -> dict:
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LabelError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    op = d.get("op") if isinstance(d, dict) else None
    if op == "label":
        if d.get("axis") not in AXES or d.get("choice") not in CHOICES or not isinstance(d.get("matchup"), str) \
                or not isinstance(d.get("stamp"), str):
            raise LabelError(f"{where}: a label record has matchup, axis (identity|prompt), choice (a|b|tie), stamp")
    elif op == "undo":
        if d.get("axis") not in AXES or not isinstance(d.get("matchup"), str):
            raise LabelError(f"{where}: an undo record names the matchup and axis it takes back")
    else:
        raise LabelError(f"{where}: op must be \"label\" or \"undo\", got {op!r}")
    return d


def replay(lines: list[str], path: Path) -> list[Judgement]:
    """The judgements standing after the records in order: a label pushes one, an undo removes the latest
    standing one of its matchup and axis. A last line without its newline is a write cut short: ignored."""
    stack: list[Judgement] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            d = _parse(raw, f"{path}:{n}")
        except LabelError:
            if n == len(lines) and not raw.endswith("\n"):
                break
            raise
        if d["op"] == "label":
            stack.append(Judgement(d["matchup"], d["axis"], d["choice"], d["stamp"]))
        else:
            for i in range(len(stack) - 1, -1, -1):
                if (stack[i].matchup, stack[i].axis) == (d["matchup"], d["axis"]):
                    del stack[i]
                    break
    return stack


def current_labels(stack: list[Judgement], folder: CandidatesFolder) -> dict[tuple[str, str], int]:
    """{(matchup, axis): +1 / -1 / 0} from the standing judgements, the latest per task; a judgement made for
    other videos (the matchup's candidates were generated again since: another stamp) no longer counts."""
    stamps = {m.id: m.stamp for m in folder.matchups}
    out = {}
    for j in stack:
        if stamps.get(j.matchup) == j.stamp:
            out[(j.matchup, j.axis)] = CHOICES[j.choice]
    return out


def read_labels(folder: CandidatesFolder, path: str | Path | None = None) -> dict[tuple[str, str], int]:
    """The human labels of a candidates folder (its labels.jsonl, or `path`); none when there is no file."""
    path = Path(path) if path is not None else folder.root / LABELS
    if not path.is_file():
        return {}
    return current_labels(replay(path.read_text().splitlines(keepends=True), path), folder)


class LabelLog:
    """labels.jsonl, append-only: records are written whole with one write and fsync'd."""

    def __init__(self, path: Path, annotator: str | None = None):
        self.path, self.annotator = path, annotator
        text = path.read_text() if path.is_file() else ""
        lines = text.splitlines(keepends=True)
        self.stack = replay(lines, path)
        if lines and not lines[-1].endswith("\n"):  # a cut-short last record: drop it before appending
            with open(path, "r+b") as f:
                f.truncate(len(text.encode()) - len(lines[-1].encode()))

    def append(self, record: dict) -> None:
        record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.annotator:
            record["annotator"] = self.annotator
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _swapped(task_id: str) -> bool:
    return hashlib.sha1(task_id.encode()).digest()[0] & 1 == 1


class LabelSession:
    """The page's state: the folder, the task list (matchup x track) and the labels; thread-safe."""

    def __init__(self, root: str | Path, track: str = "both", only_needed: bool = False, annotator: str | None = None):
        if track not in TRACKS:
            raise LabelError(f"--track {track}: one of {', '.join(TRACKS)}")
        self.root, self.track, self.only_needed, self.annotator = Path(root), track, only_needed, annotator
        self.lock = threading.Lock()
        self.folder: CandidatesFolder | None = None
        self.error: str | None = None
        self.load()

    def load(self) -> None:
        """(Re)read the folder and its labels; on failure keep the reason for the error page."""
        with self.lock:
            try:
                self.folder = CandidatesFolder.load(self.root)
                self.log = LabelLog(self.root / LABELS, self.annotator)
                self.error = None
            except (ValueError, OSError) as e:  # CandidatesError, LabelError, a file that does not decode
                self.folder, self.error = None, str(e)

    def tasks(self) -> list[tuple[Matchup, str]]:
        axes = AXES if self.track == "both" else (self.track,)
        return [(m, a) for m in self.folder.matchups for a in axes
                if not (self.only_needed and m.auto[a] is not None)]

    def _task_json(self, m: Matchup, axis: str, labels: dict) -> dict:
        s = self.folder.sets[m.set]
        url = lambda p: "/files/" + p  # noqa: E731
        a, b = {"key": "a", "video": url(m.a["video"])}, {"key": "b", "video": url(m.b["video"])}
        tid = f"{m.id}/{axis}"
        left, right = (b, a) if _swapped(tid) else (a, b)
        refs = [url(r) for r in (s.identity_references if axis == "identity" else [s.references[s.primary]])]
        v = labels.get((m.id, axis))
        return {"id": tid, "matchup": m.id, "axis": axis, "set": s.id, "left": left, "right": right,
                "references": refs, "prompt": s.prompt if axis == "prompt" else None,
                "choice": None if v is None else {1: "a", -1: "b", 0: "tie"}[v]}

    def state(self, write: bool = False) -> dict:
        """What the page shows; `write`: also rewrite pairs.jsonl (after a change)."""
        labels = current_labels(self.log.stack, self.folder)
        tasks = [self._task_json(m, a, labels) for m, a in self.tasks()]
        done = sum(t["choice"] is not None for t in tasks)
        current = next((i for i, t in enumerate(tasks) if t["choice"] is None), None)
        summary = merge_pairs(self.folder, labels, write=write)
        own = {(m.id, a): m.stamp for m, a in self.tasks()}
        return {"folder": str(self.root), "tasks": tasks, "done": done, "total": len(tasks), "current": current,
                "pairs": summary.line(), "pairs_file": str(summary.path),
                "can_undo": self._undoable(own) is not None}

    def _reread(self) -> dict[tuple[str, str], str]:
        """labels.jsonl as it is now (a page on another track may have written to it), and this page's tasks
        with the stamp a judgement of each must carry."""
        self.log = LabelLog(self.root / LABELS, self.annotator)
        return {(m.id, a): m.stamp for m, a in self.tasks()}

    def _undoable(self, own: dict) -> int | None:
        """The stack index of the latest judgement that still counts on this page's tasks."""
        return next((i for i in range(len(self.log.stack) - 1, -1, -1)
                     if own.get((self.log.stack[i].matchup, self.log.stack[i].axis)) == self.log.stack[i].stamp), None)

    def label(self, body: dict) -> dict:
        with self.lock:
            own = self._reread()
            key, choice = (body.get("matchup"), body.get("axis")), body.get("choice")
            if not all(isinstance(k, str) for k in key) or key not in own or choice not in CHOICES:
                raise LabelError("a label needs a matchup and axis (identity|prompt) of this page's tasks and a choice "
                                 "(a|b|tie)")
            self.log.append({"op": "label", "matchup": key[0], "axis": key[1], "choice": choice, "stamp": own[key],
                             "left": body.get("left") if body.get("left") in ("a", "b") else None})
            self.log.stack.append(Judgement(key[0], key[1], choice, own[key]))
            return self.state(write=True)

    def undo(self) -> dict:
        """Take back the latest judgement on this page's tasks (a page on the other track keeps its own)."""
        with self.lock:
            i = self._undoable(self._reread())
            if i is None:
                raise LabelError("nothing to undo")
            j = self.log.stack.pop(i)
            self.log.append({"op": "undo", "matchup": j.matchup, "axis": j.axis})
            return self.state(write=True)


# ---------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------

def error_page(root: Path, error: str) -> str:
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>AnyID labelling: cannot read "
            "the candidates folder</title></head><body style=\"font-family:sans-serif;max-width:60em;margin:2em auto\">"
            f"<h1 id=\"error-title\">Cannot read the candidates folder</h1><p><code>{html.escape(str(root))}</code>"
            f"</p><pre id=\"error\" style=\"white-space:pre-wrap;background:#fee;padding:1em\">{html.escape(error)}"
            "</pre><p>Make the folder with <code>anyid-rt train candidates ... --out DIR</code> (running it again "
            "finishes an interrupted folder), fix the file named above, then reload this page.</p></body></html>")


class LabelHandler(BaseHTTPRequestHandler):
    server: "LabelServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # the terminal shows the page's address and errors, not every request
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _host_ok(self) -> bool:
        """Loopback servers answer only requests addressed to a loopback name (a web page elsewhere cannot
        reach them through DNS rebinding)."""
        if self.server.server_address[0] not in ("127.0.0.1", "::1"):
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        return host in LOOPBACK

    def do_GET(self):  # noqa: N802
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        path = urlsplit(self.path).path
        session = self.server.session
        if path in ("/", "/index.html"):
            session.load()  # a reload sees the folder as it is now (fixed, finished, or labelled elsewhere)
            if session.error is not None:
                return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, error_page(session.root, session.error).encode(),
                                  "text/html; charset=utf-8")
            return self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        if path == "/api/state":
            if session.error is not None:
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": session.error})
            with session.lock:
                return self._json(HTTPStatus.OK, session.state())
        if path.startswith("/files/"):
            return self._file(unquote(path[len("/files/"):]))
        return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    do_HEAD = do_GET

    def do_POST(self):  # noqa: N802
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            return self._json(HTTPStatus.FORBIDDEN, {"error": "cross-origin request refused"})
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
        try:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(min(n, 1 << 16)) or b"{}")
        except (ValueError, json.JSONDecodeError):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"})
        session = self.server.session
        if session.error is not None:
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": session.error})
        path = urlsplit(self.path).path
        try:
            if path == "/api/label" and isinstance(body, dict):
                return self._json(HTTPStatus.OK, session.label(body))
            if path == "/api/undo":
                return self._json(HTTPStatus.OK, session.undo())
        except LabelError as e:
            return self._json(HTTPStatus.CONFLICT if "undo" in str(e) else HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except OSError as e:  # labels.jsonl or pairs.jsonl could not be written: say so, keep serving
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"could not write: {e}"})
        return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such action: {path}"})

    def _file(self, rel: str) -> None:
        """An image or video inside the candidates folder; a Range header gets that part (206)."""
        root = self.server.session.root.resolve()
        p = (root / rel).resolve()
        if not rel or Path(rel).is_absolute() or not p.is_relative_to(root) or not p.is_file() or \
                p.suffix.lower() not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not a media file of the candidates folder"})
        size = p.stat().st_size
        start, end = 0, size - 1
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        status = HTTPStatus.OK
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start, end = int(m.group(1)), min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            else:  # the last N bytes
                start = max(size - int(m.group(2)), 0)
            if start > end:
                return self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "text/plain",
                                  {"Content-Range": f"bytes */{size}"})
            status = HTTPStatus.PARTIAL_CONTENT
        with open(p, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        extra = {"Accept-Ranges": "bytes"}
        if status == HTTPStatus.PARTIAL_CONTENT:
            extra["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, body, mimetypes.guess_type(p.name)[0] or "application/octet-stream", extra)


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, session: LabelSession, host: str = "127.0.0.1", port: int = 8765, verbose: bool = False):
        self.session, self.verbose = session, verbose
        if ":" in host:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__((host, port), LabelHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 8765, track: str = "both",
                only_needed: bool = False, annotator: str | None = None, verbose: bool = False) -> LabelServer:
    """A labelling server for `root` (bound, not yet serving: call serve_forever). Port 0 picks a free one."""
    return LabelServer(LabelSession(root, track, only_needed, annotator), host, port, verbose)


def cmd_label(args) -> int:
    root = Path(args.folder)
    if not root.is_dir():
        print(f"anyid-rt label: error: {root}: no such folder (make one with `anyid-rt train candidates ... --out "
              f"{root}`)", file=sys.stderr)
        return 2
    try:
        server = make_server(root, args.host, args.port, args.track, args.only_needed, args.annotator, args.verbose)
    except LabelError as e:
        print(f"anyid-rt label: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"anyid-rt label: error: cannot listen on {args.host}:{args.port} ({e.strerror}); try another "
              "--port", file=sys.stderr)
        return 2
    session = server.session
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}: anyone who can reach this address can read the videos and "
              "label them (there is no login)", file=sys.stderr)
    if session.error is not None:
        print(f"anyid-rt label: the folder does not read ({session.error}); the page says so until it is fixed",
              file=sys.stderr)
    else:
        with session.lock:
            st = session.state()
        print(f"{len(session.folder.matchups)} matchup(s), {st['total']} judgement(s) to make, {st['done']} made; "
              f"labels: {root / LABELS}; pairs: {root / PAIRS}")
    print(f"open {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nanyid-rt label: stopped; every judgement made is in labels.jsonl (the page resumes there)")
        return 0
    finally:
        server.server_close()
    return 0


__all__ = ["LabelError", "LabelLog", "LabelSession", "LabelServer", "Judgement", "make_server", "read_labels",
           "replay", "current_labels", "error_page", "cmd_label"]
