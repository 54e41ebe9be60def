"""A local stand-in for the Hugging Face hub: the few endpoints that `model_info` and
`hf_hub_download` use, serving model folders from disk, and a log of every request.

    with HubServer({"org/name": folder}) as hub:   # hub.url -> HF_ENDPOINT
        ...
        hub.requests  # ["GET /api/models/org/name", "HEAD /org/name/resolve/<sha>/config.json", ...]

Tests point HF_ENDPOINT at it: prefetch downloads through the real huggingface_hub
client, and a build that must make no hub request is checked against the log.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubServer:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        # a fixed commit per repo, as the hub's 40-hex sha
        self.commits = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                server.requests.append(f"{self.command} {path}")
                if path.startswith("/api/models/"):
                    repo = path.removeprefix("/api/models/").split("/revision/")[0]
                    if repo not in server.repos:
                        return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
                    files = sorted(p.name for p in server.repos[repo].iterdir() if p.is_file())
                    doc = {
                        "id": repo,
                        "modelId": repo,
                        "sha": server.commits[repo],
                        "siblings": [{"rfilename": f} for f in files],
                        "private": False,
                        "gated": False,
                    }
                    return self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, body)
                repo, sep, rest = path.lstrip("/").partition("/resolve/")
                if not sep or repo not in server.repos:
                    return self._send(404, b"not found", {"X-Error-Code": "RepoNotFound"}, body)
                _rev, _, name = rest.partition("/")
                file = server.repos[repo] / name
                if not file.is_file():
                    return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, body)
                data = file.read_bytes()
                headers = {
                    "X-Repo-Commit": server.commits[repo],
                    "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                    "Content-Type": "application/octet-stream",
                }
                return self._send(200, data, headers, body)

            def _send(self, code: int, data: bytes, headers: dict[str, str], body: bool = True) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
