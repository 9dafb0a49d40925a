"""The Hub backend without network: huggingface_hub's client-factory hook serves a fake Hub from an httpx2 MockTransport;
downloads are served offline from a hand-built huggingface_hub cache."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from pathlib import Path

import httpx2  # huggingface_hub's HTTP stack; only the tests touch it (MockTransport)
import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import _http as hf_http

from speechless.cli import run
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.store import HubStore, StoreConfig, open_store

FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"
NS = "my-org"
REPO = f"{NS}/speechless-stage1"


class FakeHub:
    """Just enough of the Hub API for HubStore: repo creation, refs, tree, preupload, commit, tag, commit listing."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[httpx2.Request] = []
        self.failures: dict[str, object] = {}  # endpoint kind -> HTTP status or "timeout"
        self.counter = 0

    def _sha(self) -> str:
        self.counter += 1
        return hashlib.sha1(f"commit-{self.counter}".encode()).hexdigest()

    def _new_commit(self, repo: dict, files: dict[str, bytes], title: str, parent: str | None) -> str:
        sha = self._sha()
        repo["commits"][sha] = {"files": files, "title": title, "parent": parent, "date": f"2026-01-01T00:00:{self.counter:02d}.000Z"}
        repo["main"] = sha
        return sha

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if path == "/api/repos/create":
            kind, repo_id, rest = "create", None, ""
        elif path == "/api/models":
            kind, repo_id, rest = "models", None, ""
        elif path == "/api/validate-yaml":  # model cards (README.md with YAML front matter) are validated before a commit
            kind, repo_id, rest = "validate_yaml", None, ""
        elif resolve:
            kind, repo_id, rest = "resolve", resolve.group(1), f"{resolve.group(2)}/{resolve.group(3)}"
        else:
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(refs|tree|preupload|commit|tag|commits|revision)(?:/(.*))?", path)
            if not m:
                return httpx2.Response(404, json={"error": f"fake hub: no route {path}"})
            repo_id, kind, rest = m.group(1), m.group(2), m.group(3) or ""
        failure = self.failures.get(kind) or self.failures.get("*")
        if failure == "timeout":
            raise httpx2.ReadTimeout("timed out", request=request)
        if failure is not None:
            return httpx2.Response(int(failure), json={"error": "injected failure"})
        return getattr(self, f"on_{kind}")(request, repo_id, rest)

    def on_create(self, request, _repo_id, _rest):
        body = json.loads(request.content)
        repo_id = f"{body['organization']}/{body['name']}"
        if repo_id in self.repos:
            return httpx2.Response(409, json={"error": "You already created this model repo", "url": f"https://huggingface.co/{repo_id}"})
        repo = {"commits": {}, "tags": {}, "main": None, "visibility": body.get("visibility")}
        self._new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit", None)
        self.repos[repo_id] = repo
        return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo_id}", "name": repo_id})

    def on_models(self, request, _repo_id, _rest):
        author, search = request.url.params.get("author"), request.url.params.get("search", "")
        return httpx2.Response(200, json=[
            {"id": r, "_id": r, "modelId": r, "private": True} for r in sorted(self.repos)
            if r.startswith(f"{author}/") and search in r.split("/", 1)[1]
        ])

    def on_validate_yaml(self, request, _repo_id, _rest):
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def on_resolve(self, request, repo_id, rest):
        repo = self._repo(repo_id)
        if repo is None:
            return self._not_found()
        rev, _, file = rest.partition("/")
        sha = self._resolve(repo, rev)
        files = repo["commits"][sha]["files"] if sha else {}
        if file not in files:
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "no file"})
        data = files[file]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Content-Length": str(len(data))}
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)

    def _repo(self, repo_id):
        return self.repos.get(repo_id)

    @staticmethod
    def _not_found():
        return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "Repository not found"})

    def on_refs(self, request, repo_id, _rest):
        repo = self._repo(repo_id)
        if repo is None:
            return self._not_found()
        tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo["tags"].items()]
        branches = [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo["main"]}]
        return httpx2.Response(200, json={"branches": branches, "converts": [], "tags": tags})

    def _resolve(self, repo, rev):
        if rev == "main":
            return repo["main"]
        if rev in repo["tags"]:
            return repo["tags"][rev]
        return rev if rev in repo["commits"] else None

    def on_tree(self, request, repo_id, rest):
        repo = self._repo(repo_id)
        if repo is None:
            return self._not_found()
        sha = self._resolve(repo, rest.split("/")[0])
        if sha is None:
            return httpx2.Response(404, headers={"X-Error-Code": "RevisionNotFound"}, json={"error": "no rev"})
        files = repo["commits"][sha]["files"]
        return httpx2.Response(200, json=[
            {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for p, b in sorted(files.items())
        ])

    def on_preupload(self, request, repo_id, _rest):
        if self._repo(repo_id) is None:
            return self._not_found()
        body = json.loads(request.content)
        return httpx2.Response(200, json={"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body["files"]
        ]})

    def on_commit(self, request, repo_id, rest):
        repo = self._repo(repo_id)
        if repo is None:
            return self._not_found()
        assert rest == "main"
        lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
        header = lines[0]
        assert header["key"] == "header"
        parent = header["value"].get("parentCommit")
        if parent is not None and parent != repo["main"]:
            return httpx2.Response(412, json={"error": "parent commit is not the head of main"})
        files = dict(repo["commits"][repo["main"]]["files"])
        for item in lines[1:]:
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                del files[item["value"]["path"]]
            else:
                raise AssertionError(f"unexpected commit item {item['key']}")
        sha = self._new_commit(repo, files, header["value"]["summary"], repo["main"])
        return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def on_tag(self, request, repo_id, rest):
        repo = self._repo(repo_id)
        if repo is None:
            return self._not_found()
        tag = json.loads(request.content)["tag"]
        if tag in repo["tags"]:
            return httpx2.Response(409, json={"error": "tag exists"})
        if rest not in repo["commits"]:
            return httpx2.Response(404, headers={"X-Error-Code": "RevisionNotFound"}, json={"error": "no rev"})
        repo["tags"][tag] = rest
        return httpx2.Response(200, json={})

    def on_commits(self, request, repo_id, rest):
        repo = self._repo(repo_id)
        if repo is None:
            return self._not_found()
        sha = self._resolve(repo, rest)
        out = []
        while sha is not None:
            c = repo["commits"][sha]
            out.append({"id": sha, "authors": [{"user": "me"}], "date": c["date"], "title": c["title"], "message": ""})
            sha = c["parent"]
        return httpx2.Response(200, json=out)

    # helpers for assertions
    def commit_requests(self) -> list[httpx2.Request]:
        return [r for r in self.requests if "/commit/" in r.url.path]

    def tag_requests(self) -> list[httpx2.Request]:
        return [r for r in self.requests if "/tag/" in r.url.path]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Route every huggingface_hub request to a FakeHub; restore the default client factory afterwards."""
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub 2.4 fetches and caches an "agent harnesses" list (user-agent telemetry) under HF_HOME: keep the
    # real HF_HOME untouched and the request log limited to what the store does.
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / ".agent_harnesses.json"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_http.time, "sleep", lambda s: None)  # huggingface_hub's retry backoff: no real waiting
    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(
            transport=httpx2.MockTransport(hub.handler),
            event_hooks={"request": [hf_http.hf_request_event_hook]},  # keeps offline-mode checks and request ids
            follow_redirects=True,
        )
    )
    try:
        yield hub
    finally:
        huggingface_hub.set_client_factory(hf_http.default_client_factory)


def make_ckpt(folder: Path, seed: bytes, with_extra: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(seed * 64)
    (folder / "config.json").write_text(json.dumps({"seed": seed.hex()}))
    (folder / "work").mkdir()
    (folder / "work" / "resume.json").write_text("{}")
    if with_extra:
        (folder / "notes.md").write_text("extra\n")
    return folder


def hub_args(tmp_path) -> list[str]:
    return ["--backend", "hub", "--hub-namespace", NS]


def assert_token_never_leaked(*texts: str, folder: Path | None = None) -> None:
    for text in texts:
        assert FAKE_TOKEN not in text
    if folder is not None:
        for path in folder.rglob("*"):
            if path.is_file():
                assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_push_is_one_commit_then_a_tag(tmp_path, fake_hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    v1_dir = make_ckpt(tmp_path / "c1", b"\x01", with_extra=True)
    v2_dir = make_ckpt(tmp_path / "c2", b"\x02")
    assert run(["hub", "push", str(v1_dir), "--stage", "stage1", *hub_args(tmp_path), "-m", "first"]) == 0
    out = capsys.readouterr()
    ref, sha = out.out.split()
    assert ref == "stage1@v1" and len(sha) == 40

    commits, tags = fake_hub.commit_requests(), fake_hub.tag_requests()
    assert len(commits) == 1 and len(tags) == 1
    body = [json.loads(line) for line in commits[0].content.decode().splitlines()]
    added = {item["value"]["path"]: base64.b64decode(item["value"]["content"]) for item in body if item["key"] == "file"}
    assert added == {p: (v1_dir / p).read_bytes() for p in ("model.safetensors", "config.json", "notes.md")}
    assert tags[0].url.path == f"/api/models/{REPO}/tag/{sha}" and json.loads(tags[0].content) == {"tag": "v1"}
    assert fake_hub.repos[REPO]["tags"] == {"v1": sha}
    assert fake_hub.repos[REPO]["visibility"] == "private"
    # the token came from the environment and was sent, but never shown
    assert all(r.headers.get("authorization") == f"Bearer {FAKE_TOKEN}" for r in fake_hub.requests)

    assert run(["hub", "push", str(v2_dir), "--stage", "stage1", *hub_args(tmp_path), "--format", "json"]) == 0
    v2 = json.loads(capsys.readouterr().out)
    assert v2["version"] == "v2" and v2["location"] == REPO
    assert len(fake_hub.commit_requests()) == 2 and len(fake_hub.tag_requests()) == 2
    # v2's commit holds exactly v2's files: notes.md from v1 was deleted in the same commit
    tree = fake_hub.repos[REPO]["commits"][v2["revision"]]["files"]
    assert set(tree) == {".gitattributes", "model.safetensors", "config.json"}
    assert tree["model.safetensors"] == (v2_dir / "model.safetensors").read_bytes()

    store = open_store(StoreConfig(backend="hub", hub_namespace=NS))
    assert isinstance(store, HubStore)
    assert store.resolve("stage1").version == "v2"
    v1 = store.resolve("stage1@v1")
    assert v1.revision == sha and v1.files == ("config.json", "model.safetensors", "notes.md") and v1.message == "first"
    assert store.resolve(f"stage1@{sha[:9]}").version == "v1"
    assert [(v.version, v.revision) for v in store.list("stage1")] == [("v1", sha), ("v2", v2["revision"])]

    # online download: snapshot_download of the tagged commit into the (tmp) huggingface_hub cache
    got = store.download("stage1@v1", tmp_path / "dl-v1")
    assert {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()} == {
        p: (v1_dir / p).read_bytes() for p in ("model.safetensors", "config.json", "notes.md")
    }
    downloaded = [r.url.path for r in fake_hub.requests if "/resolve/" in r.url.path]
    assert downloaded and not any(p.endswith(".gitattributes") for p in downloaded)
    cached = store.download("stage1@v2")
    assert sorted(p.name for p in cached.rglob("*") if p.is_file()) == ["config.json", "model.safetensors"]
    assert [v.ref for v in store.list()] == ["stage1@v1", "stage1@v2"]  # all stages: the namespace's repos

    assert run(["hub", "list", "stage1", *hub_args(tmp_path)]) == 0
    assert run(["hub", "show", "stage1@v1", *hub_args(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "notes.md" in out.out
    assert_token_never_leaked(out.out, out.err, caplog.text, folder=tmp_path)


def test_tag_taken_by_a_concurrent_push_moves_to_next_number(tmp_path, fake_hub):
    store = HubStore(StoreConfig(backend="hub", hub_namespace=NS))
    store.push("stage1", make_ckpt(tmp_path / "c1", b"\x01"))
    real = fake_hub.on_tag
    state = {"stolen": False}

    def steal_v2(request, repo_id, rest):
        if not state["stolen"]:
            state["stolen"] = True
            fake_hub.repos[repo_id]["tags"]["v2"] = fake_hub.repos[repo_id]["tags"]["v1"]
        return real(request, repo_id, rest)

    fake_hub.on_tag = steal_v2
    v = store.push("stage1", make_ckpt(tmp_path / "c2", b"\x02"))
    assert v.version == "v3"
    assert fake_hub.repos[REPO]["tags"]["v3"] == v.revision


@pytest.mark.parametrize(
    "kind, failure, code, words",
    [
        ("create", 401, 2, "set HF_TOKEN / huggingface-cli login, check write access to my-org/speechless-stage1"),
        ("*", 403, 2, "set HF_TOKEN / huggingface-cli login, check write access to my-org/speechless-stage1"),
        ("commit", 404, 2, "repo/version not found"),
        ("commit", 429, 1, "Hub unavailable (HTTP 429)"),
        ("commit", 500, 1, "Hub unavailable (HTTP 500)"),
        ("preupload", 503, 1, "Hub unavailable (HTTP 503)"),
        ("refs", "timeout", 1, "Hub unavailable (timeout)"),
        ("commit", "timeout", 1, "Hub unavailable (timeout)"),
    ],
)
def test_push_errors_are_one_clear_line_and_local_state_intact(tmp_path, fake_hub, capsys, caplog, kind, failure, code, words):
    caplog.set_level(logging.DEBUG)
    folder = make_ckpt(tmp_path / "c1", b"\x07", with_extra=True)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    fake_hub.failures[kind] = failure
    assert run(["hub", "push", str(folder), "--stage", "stage1", *hub_args(tmp_path)]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in " ".join(err.split()), err
    if code == 1:
        assert "local state intact, retry the push" in " ".join(err.split())
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert not fake_hub.tag_requests()
    assert_token_never_leaked(err, caplog.text, folder=tmp_path)


def test_unknown_stage_or_version_on_hub(tmp_path, fake_hub, capsys):
    store = HubStore(StoreConfig(backend="hub", hub_namespace=NS))
    with pytest.raises(UsageError, match="no versions"):
        store.resolve("stage9@v1")
    store.push("stage1", make_ckpt(tmp_path / "c1", b"\x01"))
    with pytest.raises(UsageError, match="available: v1"):
        store.resolve("stage1@v4")
    fake_hub.failures["refs"] = 500
    assert run(["hub", "show", "stage1@v1", *hub_args(tmp_path)]) == 1
    assert "Hub unavailable (HTTP 500)" in capsys.readouterr().err


def test_hub_needs_namespace(monkeypatch, capsys):
    monkeypatch.delenv("SPEECHLESS_HUB_NAMESPACE", raising=False)
    assert run(["hub", "list", "--backend", "hub"]) == 2
    assert "namespace" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Download through a hand-built huggingface_hub cache, offline.


def build_cache(cache: Path, repo_id: str, versions: dict[str, dict[str, bytes]]) -> dict[str, str]:
    """models--ns--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<tag>} (no newline)."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    shas = {}
    for tag, files in versions.items():
        commit = hashlib.sha1(f"{repo_id}-{tag}".encode()).hexdigest()
        shas[tag] = commit
        for rel, data in files.items():
            blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = folder / "snapshots" / commit / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            depth = len(Path(rel).parts) + 1  # snapshots/<commit>/<rel...>
            link.symlink_to(Path(*([".."] * depth)) / "blobs" / blob.name)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / tag).write_text(commit)  # no trailing newline
        (folder / "refs" / "main").write_text(commit)
    return shas


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE, HF_HUB_CACHE and HF_HOME are read when huggingface_hub is imported: patch the constants too."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / ".agent_harnesses.json"))
    versions = {
        "v1": {"model.safetensors": b"\x11" * 300, "config.json": b'{"v": 1}', "sub/README.md": b"# one\n"},
        "v2": {"model.safetensors": b"\x22" * 200, "config.json": b'{"v": 2}'},
    }
    shas = build_cache(cache, REPO, versions)
    return cache, versions, shas


def read_tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_offline_download_from_cache_by_tag_sha_and_latest(tmp_path, offline_cache, capsys):
    _cache, versions, shas = offline_cache
    store = open_store(StoreConfig(backend="hub", hub_namespace=NS))
    assert read_tree(store.download("stage1@v1")) == versions["v1"]
    assert read_tree(store.download(f"stage1@{shas['v2']}")) == versions["v2"]
    assert read_tree(store.download(f"stage1@{shas['v1'][:10]}")) == versions["v1"]
    assert store.resolve("stage1").version == "v2"
    assert [v.version for v in store.list()] == ["v1", "v2"]

    dest = tmp_path / "out"
    assert run(["hub", "download", "stage1@v1", "--to", str(dest), *hub_args(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert read_tree(dest) == versions["v1"]
    assert not any(p.is_symlink() for p in dest.rglob("*"))  # real copies, not links into the cache

    assert run(["hub", "download", "stage1@v5", *hub_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "available: v1, v2" in err
    assert run(["hub", "push", str(dest), "--stage", "stage1", *hub_args(tmp_path)]) == 1
    assert "offline" in capsys.readouterr().err


def test_offline_download_of_uncached_sha_is_clear(tmp_path, offline_cache):
    store = open_store(StoreConfig(backend="hub", hub_namespace=NS))
    with pytest.raises((UsageError, RuntimeFailure)) as info:
        store.download("stage1@" + "f" * 40)
    assert "\n" not in str(info.value)
