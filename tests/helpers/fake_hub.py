"""A local fake of the Hugging Face Hub's HTTP API: what `publish` sends, and its answers.

The fixtures that serve it (`online`, `fake_hub`) are in tests/conftest.py.
"""

from __future__ import annotations

import base64
import json
from http.server import BaseHTTPRequestHandler
from typing import Any

REPO = "alice/saes"  # the repository the fake answers for


class FakeHub:
    """Requests seen and files committed, per repo."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, auth header
        self.created: list[dict[str, Any]] = []
        self.validated: list[dict[str, Any]] = []
        self.branches: list[str] = []
        self.preupload: list[dict[str, Any]] = []
        self.commits: list[dict[str, Any]] = []  # {"header": ..., "files": {path: bytes}}
        self.fail_commit_with: int | None = None


def _handler(hub: FakeHub, base_url: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _reply(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path, self.headers.get("authorization")))
            if self.path.startswith("/api/whoami"):
                self._reply(200, {"name": "alice", "type": "user", "auth": {}})
            else:
                self._reply(404, {"error": f"not implemented: GET {self.path}"})

        def do_POST(self) -> None:
            body = self._body()
            path = self.path.split("?")[0]
            hub.requests.append(("POST", path, self.headers.get("authorization")))
            prefix = f"/api/models/{REPO}/"
            if path == "/api/validate-yaml":  # the README's front matter, before any upload
                hub.validated.append(json.loads(body))
                self._reply(200, {"errors": [], "warnings": []})
            elif path == "/api/repos/create":
                hub.created.append(json.loads(body))
                self._reply(200, {"url": f"{base_url[0]}/{REPO}"})
            elif path.startswith(prefix + "branch/"):
                hub.branches.append(path.rsplit("/", 1)[1])
                self._reply(200, {})
            elif path.startswith(prefix + "preupload/"):
                payload = json.loads(body)
                hub.preupload.append(payload)
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in payload["files"]
                ]
                self._reply(200, {"files": files})
            elif path.startswith(prefix + "commit/"):
                if hub.fail_commit_with is not None:
                    self._reply(hub.fail_commit_with, {"error": "Forbidden: no write access"})
                    return
                lines = [json.loads(line) for line in body.decode().splitlines() if line]
                files = {}
                for item in lines[1:]:
                    assert item["key"] == "file" and item["value"]["encoding"] == "base64"
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                hub.commits.append(
                    {"header": lines[0], "files": files, "revision": path.rsplit("/", 1)[1]}
                )
                self._reply(
                    200, {"commitUrl": f"{base_url[0]}/{REPO}/commit/abc", "commitOid": "a" * 40}
                )
            else:
                self._reply(404, {"error": f"not implemented: POST {path}"})

    return Handler
