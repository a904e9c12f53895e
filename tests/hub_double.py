"""A local double of the Hugging Face Hub: the HTTP API subset that huggingface_hub uses.

Test infrastructure only (see ../shared/docs/hub-api.md): an HTTP server on 127.0.0.1 that
keeps repositories in memory, with commits, branches, pull-request refs, LFS uploads,
private repos and token checks. quantcli never knows it exists: it is reached through
huggingface_hub with HF_ENDPOINT pointing here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]  # path -> content
    lfs: set[str]  # paths stored through LFS
    message: str


@dataclass
class Repo:
    owner: str
    name: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: int = 0

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.name}"


class HubState:
    """Everything the double knows; tests may inspect it."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.secret = b"hub-double-signing-key"
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        #: A network fault for requests whose path starts with `fault_prefix`: "stall"
        #: (read the request, never answer) or "reset" (drop the connection with a RST).
        self.fault: str | None = None
        self.fault_prefix = "/"
        self.released = threading.Event()  # set on shutdown: stalled handlers return

    def commit(self, repo: Repo, parent: str | None, files, lfs, message) -> Commit:
        seed = f"{repo.repo_id}{parent}{message}{time.time_ns()}{sorted(files)}".encode()
        sha = hashlib.sha1(seed).hexdigest()
        commit = Commit(sha, files, lfs, message)
        repo.commits[sha] = commit
        return commit

    def sign(self, oid: str) -> str:
        return hmac.new(self.secret, oid.encode(), "sha256").hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Handler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # --- plumbing ---------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.state.requests.append((method, path))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.state.fault and path.startswith(self.state.fault_prefix):
            return self._misbehave(self.state.fault)
        try:
            with self.state.lock:
                self._route(method, path, query, body)
        except HubError as error:
            headers = {"X-Error-Code": error.code} if error.code else {}
            headers["X-Error-Message"] = error.message
            self._send(error.status, {"error": error.message}, headers)

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_PUT = lambda self: self._dispatch("PUT")  # noqa: E731

    def _misbehave(self, fault: str) -> None:
        self.close_connection = True
        if fault == "stall":
            self.state.released.wait()
        elif fault == "reset":  # linger 0: close() sends RST instead of FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        else:
            raise ValueError(f"unknown fault {fault!r}")

    def _send(self, status: int, payload=None, headers=None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        user = self.state.tokens.get(auth.removeprefix("Bearer "))
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and user != repo.owner:
            raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    # --- routes -----------------------------------------------------------------------

    def _route(self, method, path, query, body) -> None:  # noqa: C901 (a routing table)
        state = self.state
        if path == "/api/whoami-v2":
            user = self._user()
            if user is None:
                raise HubError(401, "Unauthorized")
            return self._send(200, {"type": "user", "name": user, "auth": {}})
        if path == "/api/repos/create" and method == "POST":
            user = self._user()
            if user is None:
                raise HubError(401, "You must be authenticated to create a repo")
            request = json.loads(body)
            owner = request.get("organization") or user
            if owner != user:
                raise HubError(403, "You don't have the rights to create a repo here")
            repo_id = f"{owner}/{request['name']}"
            url = f"{self._endpoint()}/{repo_id}"
            if repo_id in state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            repo = Repo(
                owner,
                request["name"],
                request.get("visibility") == "private" or bool(request.get("private")),
            )
            initial = state.commit(
                repo,
                None,
                {".gitattributes": b"*.safetensors filter=lfs\n"},
                set(),
                "initial commit",
            )
            repo.refs["main"] = initial.sha
            state.repos[repo_id] = repo
            return self._send(200, {"url": url, "name": repo_id})
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})

        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(.*))?", path)
        if match:
            return self._api_model(method, match.group(1), match.group(2) or "", query, body)
        match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if match and method == "POST":
            return self._lfs_batch(match.group(1), body)
        match = re.fullmatch(r"/lfs/(upload|verify)/([0-9a-f]{64})", path)
        if match:
            return self._lfs_object(match.group(1), match.group(2), query, body)
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match and method in ("GET", "HEAD"):
            return self._resolve(*match.groups())
        raise HubError(404, f"no route for {method} {path}")

    def _endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _api_model(self, method, repo_id, rest, query, body) -> None:
        if rest == "" or rest.startswith("revision/"):
            repo = self._repo(repo_id)
            commit = self._commit(repo, rest.removeprefix("revision/") or "main")
            return self._send(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit.sha,
                    "private": repo.private,
                    "lastModified": "2026-11-22T00:00:00.000Z",
                    "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                },
            )
        if rest.startswith("preupload/") and method == "POST":
            repo = self._repo(repo_id, write=True)
            commit = self._commit(repo, rest.removeprefix("preupload/"))
            files = []
            for entry in json.loads(body)["files"]:
                lfs = entry["size"] >= LFS_THRESHOLD or entry["path"].endswith(".safetensors")
                existing = commit.files.get(entry["path"])
                oid = None
                if existing is not None:
                    in_lfs = entry["path"] in commit.lfs
                    oid = hashlib.sha256(existing).hexdigest() if in_lfs else git_blob_sha(existing)
                files.append(
                    {
                        "path": entry["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            return self._send(200, {"files": files})
        if rest.startswith("commit/") and method == "POST":
            return self._commit_route(repo_id, rest.removeprefix("commit/"), query, body)
        if rest.startswith("branch/") and method == "POST":
            repo = self._repo(repo_id, write=True)
            branch = rest.removeprefix("branch/")
            if branch in repo.refs:
                raise HubError(409, "Reference already exists")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo.refs[branch] = self._commit(repo, start).sha
            return self._send(200, {})
        if rest.startswith("tree/") and method == "GET":
            repo = self._repo(repo_id)
            rev, _, prefix = rest.removeprefix("tree/").partition("/")
            commit = self._commit(repo, rev)
            entries = []
            for p, data in sorted(commit.files.items()):
                if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                    continue
                entry = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha(data)}
                if p in commit.lfs:
                    entry["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                entries.append(entry)
            return self._send(200, entries)
        raise HubError(404, f"no route for {method} /api/models/{repo_id}/{rest}")

    def _commit_route(self, repo_id, rev, query, body) -> None:
        state = self.state
        repo = self._repo(repo_id, write=True)
        base = self._commit(repo, rev)
        files, lfs = dict(base.files), set(base.lfs)
        summary = ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                data = state.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = data
                lfs.add(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
                lfs.discard(value["path"])
        commit = state.commit(repo, base.sha, files, lfs, summary)
        response = {
            "commitOid": commit.sha,
            "commitUrl": f"{self._endpoint()}/{repo_id}/commit/{commit.sha}",
        }
        if query.get("create_pr") == ["1"]:
            repo.pull_requests += 1
            repo.refs[f"refs/pr/{repo.pull_requests}"] = commit.sha
            discussion = f"{self._endpoint()}/{repo_id}/discussions/{repo.pull_requests}"
            response["pullRequestUrl"] = discussion
        else:
            repo.refs[rev if rev in repo.refs else "main"] = commit.sha
        return self._send(200, response)

    def _lfs_batch(self, repo_id, body) -> None:
        self._repo(repo_id, write=True)
        objects = []
        for obj in json.loads(body)["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size}
            if oid not in self.state.lfs_objects:
                signature = self.state.sign(oid)
                entry["actions"] = {
                    "upload": {"href": f"{self._endpoint()}/lfs/upload/{oid}?sig={signature}"},
                    "verify": {"href": f"{self._endpoint()}/lfs/verify/{oid}?sig={signature}"},
                }
            objects.append(entry)
        return self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_object(self, action, oid, query, body) -> None:
        if query.get("sig") != [self.state.sign(oid)]:
            raise HubError(403, "bad signature")
        if action == "upload":
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "content does not match its oid")
            self.state.lfs_objects[oid] = body
            return self._send(200, {})
        if oid not in self.state.lfs_objects:
            raise HubError(404, "object not uploaded")
        return self._send(200, {})

    def _resolve(self, repo_id, rev, file_path) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, rev)
        data = commit.files.get(file_path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        in_lfs = file_path in commit.lfs
        etag = hashlib.sha256(data).hexdigest() if in_lfs else git_blob_sha(data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"'}
        if in_lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        return self._send(200, headers=headers, raw=data)


class HubDouble:
    """The server and its state; `url` is what HF_ENDPOINT should be."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.state = HubState(tokens)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubDouble:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.state.released.set()
        self.server.shutdown()
        self.server.server_close()
