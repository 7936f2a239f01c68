"""A stand-in for the Hugging Face Hub on 127.0.0.1, for ``runai pull``'s tests.

It answers the few requests huggingface_hub makes to download a repository: the model's
info (``GET /api/models/ORG/NAME/revision/REV``: its commit and files), its tree
(``GET /api/models/ORG/NAME/tree/REV``) and each file (``HEAD``/``GET
/ORG/NAME/resolve/REV/PATH``, with ``X-Repo-Commit``, ``ETag``, ``Content-Length``, and
``Range`` for resumed downloads). A repository with a ``token`` answers 401 GatedRepo to
any request without ``Authorization: Bearer TOKEN`` (with ``public_info``, only its tree and
files, as the real Hub does). Every request is recorded.
"""

import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Repo:
    def __init__(self, files, token=None, public_info=False):
        self.files = dict(files)  # path -> bytes
        self.token = token
        # The real Hub's gated repositories: their info for anyone, their files with the token.
        self.public_info = public_info
        digest = hashlib.sha1(b"".join(p.encode() + hashlib.sha1(b).digest() for p, b in sorted(self.files.items())))
        self.sha = digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._answer(body=True)

    def do_HEAD(self):
        self._answer(body=False)

    def _send(self, status, body=b"", headers=(), send_body=True):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _json(self, value, send_body):
        self._send(200, json.dumps(value).encode(), [("Content-Type", "application/json")], send_body)

    def _error(self, status, code, send_body):
        self._send(status, json.dumps({"error": code}).encode(),
                   [("X-Error-Code", code), ("X-Error-Message", code), ("Content-Type", "application/json")],
                   send_body)

    def _answer(self, body):
        hub = self.server.hub
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        hub.requests.append((self.command, url.path))
        api = parts[:2] == ["api", "models"]
        if api:
            parts = parts[2:]
        repo = hub.repos.get("/".join(parts[:2]))
        if repo is None:
            return self._error(404, "RepoNotFound", body)
        rest = parts[2:]
        public = api and repo.public_info and rest[:1] != ["tree"]
        if repo.token is not None and not public and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(401, "GatedRepo", body)
        if api and not rest:
            rest = ["revision", "main"]
        if len(rest) < 2 or rest[1] not in ("main", repo.sha):
            return self._error(404, "RevisionNotFound", body)
        kind, path = rest[0], "/".join(rest[2:])
        if api and kind == "revision":
            return self._json({"id": "/".join(parts[:2]), "sha": repo.sha,
                               "siblings": [{"rfilename": p} for p in sorted(repo.files)]}, body)
        if api and kind == "tree":
            return self._json([{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                               for p, b in sorted(repo.files.items()) if p.startswith(path)], body)
        if not api and kind == "resolve" and path in hub.refused:
            return self._error(403, "Forbidden", body)
        if not api and kind == "resolve" and path in repo.files:
            data = repo.files[path]
            headers = [("X-Repo-Commit", repo.sha), ("ETag", f'"{hashlib.sha256(data).hexdigest()}"')]
            start = 0
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes=") and ranged.endswith("-") and self.command == "GET":
                start = int(ranged[len("bytes="):-1])
                headers.append(("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"))
            if self.command == "GET":
                hub.downloads.append(path)
            return self._send(206 if start else 200, data[start:], headers, body)
        return self._error(404, "EntryNotFound", body)


class StandInHub:
    """``start()`` it, point ``HF_ENDPOINT`` at ``endpoint``, ``stop()`` it."""

    def __init__(self, repos):
        self.repos = dict(repos)
        self.requests = []
        self.downloads = []  # the paths whose bytes were sent
        self.refused = set()  # paths answered 403

    def start(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
