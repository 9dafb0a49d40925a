"""The local checkpoint store: versions, immutability, atomic pushes, verification, refs, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from speechless.cli import run
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.store import LocalStore, StoreConfig, is_store_ref, open_store, parse_ref, store_config
from speechless.core.store import local as store_mod


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_ckpt(folder: Path, weights: bytes, note: str = "x") -> Path:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text(json.dumps({"note": note}))
    (folder / "sub" / "README.md").write_text(f"# {note}\n")
    (folder / "work").mkdir(exist_ok=True)
    (folder / "work" / "resume.json").write_text("{}")  # resume state: not part of a version
    (folder / ".hidden").write_text("secret-ish")
    return folder


@pytest.fixture
def ckpts(tmp_path):
    a = make_ckpt(tmp_path / "a", b"\x00weights-one" * 100, "one")
    b = make_ckpt(tmp_path / "b", b"\x01weights-two" * 120, "two")
    (b / "extra.jsonl").write_text('{"k": 1}\n')
    return a, b


VERSION_FILES = {"model.safetensors", "config.json", "sub/README.md"}


def test_push_two_versions_download_v1_byte_for_byte(tmp_path, ckpts, capsys, monkeypatch):
    a, b = ckpts
    root = tmp_path / "store"
    monkeypatch.chdir(tmp_path)
    assert run(["hub", "push", str(a), "--stage", "stage1", "--store-root", str(root), "-m", "first"]) == 0
    out1 = capsys.readouterr().out.split()
    assert out1[0] == "stage1@v1" and len(out1[1]) == 64
    assert run(["hub", "push", str(b), "--stage", "stage1", "--store-root", str(root), "--format", "json"]) == 0
    v2 = json.loads(capsys.readouterr().out)
    assert v2["version"] == "v2" and set(v2["files"]) == VERSION_FILES | {"extra.jsonl"}

    dest = tmp_path / "got-v1"
    assert run(["hub", "download", "stage1@v1", "--to", str(dest), "--store-root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    expected = {k: v for k, v in tree(a).items() if k in VERSION_FILES}
    assert tree(dest) == expected  # same file set, same bytes; no work/ nor hidden files

    # latest = v2, by every spelling
    s = LocalStore(root)
    assert s.resolve("stage1").version == "v2"
    assert s.resolve("stage1@latest").version == "v2"
    assert s.resolve("stage1@v1").revision == out1[1]
    assert s.resolve(f"stage1@{out1[1][:10]}").version == "v1"  # revision prefix
    latest = s.download("stage1@latest")
    assert tree(latest) == {k: v for k, v in tree(b).items() if k in VERSION_FILES | {"extra.jsonl"}}

    assert run(["hub", "list", "--store-root", str(root), "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["stage"], v["version"], v["message"]) for v in listed] == [("stage1", "v1", "first"), ("stage1", "v2", "")]
    assert run(["hub", "list", "stage1", "--store-root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "stage1@v1" in text and "stage1@v2" in text
    assert run(["hub", "show", "stage1@v1", "--store-root", str(root)]) == 0
    shown = capsys.readouterr().out
    assert out1[1] in shown and "sub/README.md" in shown


def test_env_store_root_and_precedence(tmp_path, ckpts, monkeypatch, capsys):
    a, _ = ckpts
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPEECHLESS_STORE", str(tmp_path / "envstore"))
    assert run(["hub", "push", str(a), "--stage", "s"]) == 0
    assert (tmp_path / "envstore" / "s" / "v1" / "version.json").is_file()
    # config value set explicitly beats the env var; an option beats both
    assert store_config(StoreConfig(root="cfgstore")).root == "cfgstore"
    assert store_config(StoreConfig()).root == str(tmp_path / "envstore")
    assert store_config(StoreConfig(root="cfgstore"), root="opt").root == "opt"
    monkeypatch.delenv("SPEECHLESS_STORE")
    assert store_config().root == "store"
    assert isinstance(open_store(), LocalStore)
    monkeypatch.setenv("SPEECHLESS_STORE_BACKEND", "hub")
    with pytest.raises(UsageError, match="namespace"):
        open_store()


def test_immutability(tmp_path, ckpts):
    a, b = ckpts
    s = LocalStore(tmp_path / "store")
    v1 = s.push("stage1", a)
    before = tree(Path(v1.location))
    for f in Path(v1.location).rglob("*"):
        if f.is_file():
            assert not (f.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)), f
    assert not (Path(v1.location).parent / "version.json").stat().st_mode & stat.S_IWUSR
    v2 = s.push("stage1", b)
    v3 = s.push("stage1", a)  # same content again: a new version, v1 untouched
    assert (v2.version, v3.version) == ("v2", "v3")
    assert v3.revision == v1.revision
    assert tree(Path(s.resolve("stage1@v1").location)) == before
    assert s.resolve(f"stage1@{v1.revision[:8]}").version == "v3"  # same content: the newest such version


def test_crash_mid_push_leaves_no_half_version(tmp_path, ckpts, monkeypatch):
    a, b = ckpts
    s = LocalStore(tmp_path / "store")
    s.push("stage1", a)
    real_copy = store_mod._copy_file_hashed
    calls = {"n": 0}

    def flaky(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_copy(src, dst)  # half the files are written...
            raise KeyboardInterrupt  # ...then the process is interrupted
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(store_mod, "_copy_file_hashed", flaky)
    with pytest.raises(KeyboardInterrupt):
        s.push("stage1", b)
    stage_dir = tmp_path / "store" / "stage1"
    assert sorted(p.name for p in stage_dir.iterdir() if not p.name.startswith(".")) == ["v1"]
    assert not [p for p in stage_dir.iterdir() if p.name.startswith(".incoming")]
    assert [v.version for v in s.list("stage1")] == ["v1"]

    # a hard crash (no cleanup) leaves only a hidden temp folder: invisible, never reused
    (stage_dir / ".incoming-dead").mkdir()
    (stage_dir / ".incoming-dead" / "half.json").write_text("{")
    monkeypatch.setattr(store_mod, "_copy_file_hashed", real_copy)
    v2 = s.push("stage1", b)
    assert v2.version == "v2"
    assert [v.version for v in s.list()] == ["v1", "v2"]
    assert set(tree(s.download("stage1@v2"))) == VERSION_FILES | {"extra.jsonl"}


def test_disk_error_mid_push_is_runtime_failure(tmp_path, ckpts, monkeypatch):
    a, _ = ckpts
    s = LocalStore(tmp_path / "store")

    def full(src, dst, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod, "_copy_file_hashed", full)
    with pytest.raises(RuntimeFailure, match="No space left"):
        s.push("stage1", a)
    assert s.list() == []


def test_corrupt_file_detected_on_download(tmp_path, ckpts, capsys):
    a, _ = ckpts
    root = tmp_path / "store"
    v1 = LocalStore(root).push("stage1", a)
    victim = Path(v1.location) / "model.safetensors"
    os.chmod(victim, 0o644)
    data = bytearray(victim.read_bytes())
    data[5] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(RuntimeFailure, match="model.safetensors"):
        LocalStore(root).download("stage1@v1")
    dest = tmp_path / "dest"
    assert run(["hub", "download", "stage1@v1", "--to", str(dest), "--store-root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "corrupt" in err
    assert not dest.exists()  # nothing half-copied


def test_download_to_non_empty_folder_refused(tmp_path, ckpts):
    a, _ = ckpts
    s = LocalStore(tmp_path / "store")
    s.push("stage1", a)
    dest = tmp_path / "dest"
    s.download("stage1@v1", dest)
    assert s.download("stage1@v1", dest) == dest.absolute()  # same files already there: fine
    (dest / "other.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        s.download("stage1@v1", dest)
    assert (dest / "other.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("stage1@v2", ("stage1", "v2")),
        ("stage1@latest", ("stage1", None)),
        ("stage1", ("stage1", None)),
        ("my_stage-2@v10", ("my_stage-2", "v10")),
        ("stage1@abcdef1", ("stage1", "abcdef1")),
    ],
)
def test_parse_ref_good(ref, expected):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "Stage1@v1", "stage1@", "stage1@v0", "stage1@v1.2", "stage 1", "@v1", "stage1@V2", "a/b@v1", "stage1@abc"])
def test_parse_ref_bad(ref):
    with pytest.raises(UsageError, match="STAGE@vN"):
        parse_ref(ref)


def test_is_store_ref(tmp_path):
    assert is_store_ref("stage1@v1") and is_store_ref("stage1@latest")
    assert not is_store_ref("stage1") and not is_store_ref(str(tmp_path)) and not is_store_ref("runs/x@v1")
    assert not is_store_ref("stage1@nope")


def test_unknown_stage_and_version_list_what_exists(tmp_path, ckpts, capsys):
    a, _ = ckpts
    root = tmp_path / "store"
    LocalStore(root).push("stage1", a)
    assert run(["hub", "show", "stage1@v7", "--store-root", str(root)]) == 2
    assert "available: v1" in capsys.readouterr().err
    assert run(["hub", "download", "stage2", "--store-root", str(root)]) == 2
    assert "stages there: stage1" in capsys.readouterr().err
    assert run(["hub", "show", "Bad@ref", "--store-root", str(root)]) == 2
    assert "expected STAGE@vN" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["model.pt", "opt.pth", "pytorch_model.bin", "x.pkl", "y.pickle", "z.ckpt", "train.py", "sub/m.PT"])
def test_pickles_and_code_refused(tmp_path, ckpts, capsys, name):
    a, _ = ckpts
    (a / name).parent.mkdir(parents=True, exist_ok=True)
    (a / name).write_bytes(b"\x80\x04")
    root = tmp_path / "store"
    assert run(["hub", "push", str(a), "--stage", "stage1", "--store-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert name in err and "safetensors" in err
    assert not (root / "stage1").exists() or LocalStore(root).list() == []


def test_pickles_in_work_or_hidden_are_ignored(tmp_path, ckpts):
    a, _ = ckpts
    (a / "work" / "optimizer.pt").write_bytes(b"\x80")
    (a / ".cache").mkdir()
    (a / ".cache" / "x.pkl").write_bytes(b"\x80")
    v = LocalStore(tmp_path / "store").push("stage1", a)
    assert set(v.files) == VERSION_FILES


def test_bad_push_inputs(tmp_path, capsys):
    root = tmp_path / "store"
    assert run(["hub", "push", str(tmp_path / "missing"), "--stage", "s", "--store-root", str(root)]) == 2
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "work").mkdir(parents=True)
    (empty / "work" / "x.json").write_text("{}")
    assert run(["hub", "push", str(empty), "--stage", "s", "--store-root", str(root)]) == 2
    assert "nothing to push" in capsys.readouterr().err
    assert run(["hub", "push", str(empty), "--stage", "Bad Stage", "--store-root", str(root)]) == 2
    assert run(["hub", "list", "--format", "xml", "--store-root", str(root)]) == 2


def test_concurrent_pushes_get_distinct_versions(tmp_path, ckpts):
    a, b = ckpts
    s = LocalStore(tmp_path / "store")
    results, errors = [], []
    barrier = threading.Barrier(6)

    def push(folder):
        try:
            barrier.wait()
            results.append((s.push("stage1", folder), folder))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(a if i % 2 else b,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(int(v.version[1:]) for v, _ in results) == [1, 2, 3, 4, 5, 6]
    for v, folder in results:  # each version holds exactly the content of the push that claimed it
        expected = {k: h for k, h in tree(folder).items() if not k.startswith((".", "work/"))}
        assert tree(s.download(v.ref)) == expected
        assert s.resolve(v.ref).revision == v.revision


def test_concurrent_push_without_lock_still_never_overwrites(tmp_path, ckpts, monkeypatch):
    """Even without the lock (e.g. no flock), a version folder that appeared meanwhile is never overwritten."""
    a, b = ckpts
    s = LocalStore(tmp_path / "store")
    s.push("stage1", a)
    real_rename = os.rename
    state = {"raced": False}

    def racing_rename(src, dst):
        if not state["raced"] and Path(dst).name == "v2":
            state["raced"] = True
            shutil.copytree(Path(s.resolve("stage1@v1").location).parent, dst)  # another writer wins v2
        return real_rename(src, dst)

    monkeypatch.setattr(store_mod.os, "rename", racing_rename)
    v = s.push("stage1", b)
    assert v.version == "v3"
