"""A stand-in Hugging Face Hub for tests: an http.server in a thread serving the routes `hf_hub_download`
and `snapshot_download` use (`/<repo>/resolve/<revision>/<file>`, `/api/models/<repo>/revision/<rev>`,
`/api/models/<repo>/tree/<rev>`), from an in-memory {repo: {path: bytes}}. `serve(monkeypatch, tmp_path)`
points huggingface_hub at it (HF_ENDPOINT, online, an empty cache in tmp_path) and records every request."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # every repo's only commit (any revision resolves to it)


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def add_file(self, repo: str, path: str, data: bytes) -> None:
        self.repos.setdefault(repo, {})[path] = data

    def add_folder(self, repo: str, prefix: str, folder: Path) -> None:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.add_file(repo, f"{prefix}/{file.relative_to(folder).as_posix()}", file.read_bytes())

    def _answer(self, request, head: bool) -> None:
        self.requests.append((request.command, request.path))
        api = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/?]+)", request.path)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/([^?]+)", request.path)
        if api and api.group(1) in self.repos:
            files = self.repos[api.group(1)]
            if api.group(2) == "revision":
                body = {"id": api.group(1), "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
            else:
                body = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for f, d in files.items()]
            return self._send(request, head, 200, json.dumps(body).encode(), {})
        if resolve and resolve.group(1) in self.repos:
            data = self.repos[resolve.group(1)].get(resolve.group(3))
            if data is None:
                return self._send(request, head, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self._send(request, head, 200, data, headers)
        self._send(request, head, 404, b"", {"X-Error-Code": "RepoNotFound"})

    @staticmethod
    def _send(request, head: bool, status: int, body: bytes, headers: dict) -> None:
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if not head:
            request.wfile.write(body)

    def start(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def go_online(monkeypatch, tmp_path: Path, endpoint: str) -> None:
    """huggingface_hub online, at `endpoint`, with an empty cache (its constants are read at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
