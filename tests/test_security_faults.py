"""Security and fault injection: checkpoints never run code, paths stay inside the output folder, the HF token is never
written anywhere, and a full disk, a read-only folder or a failing Hub give one clear line with local state intact and a
retry that succeeds once the fault clears."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import stage1_overrides
from test_hub_backend import FAKE_TOKEN, NS, REPO, build_cache, fake_hub  # noqa: F401  (fixture)
from test_stage2 import overrides as stage2_overrides


def set_args(*command, settings) -> list:
    return [*command, *[arg for item in settings for arg in ("--set", item)]]


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return " ".join(result.stderr.split())


# ------------------------------------------------------------------------------------------ no code from checkpoints

def plant_malicious_files(folder: Path, marker: Path) -> None:
    """Pickles whose unpickling writes `marker`, and Python files that write it when imported or run."""
    import pickle

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('pwned')",)

    blob = pickle.dumps(Payload())
    for name in ("model.pt", "pytorch_model.bin", "optimizer.pkl", "training_args.bin"):
        (folder / name).write_bytes(blob)
    code = f"open({str(marker)!r}, 'w').write('pwned')\n"
    for name in ("__init__.py", "modeling_speechless.py", "configuration.py"):
        (folder / name).write_text(code)


def test_pickles_and_python_in_checkpoints_are_never_run(stage1_trained, stage2_reference, stage2_base, corpus, tmp_path, cli,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative import of planted code would look here too
    marker = tmp_path / "PWNED"
    audio = corpus.parent / json.loads(corpus.read_text().splitlines()[0])["audio_filepath"]

    # stage-1 tokenizer and stage-2 model folders: the planted files are ignored, loading works from safetensors
    stage1 = tmp_path / "stage1"
    stage2 = tmp_path / "stage2"
    shutil.copytree(stage1_trained, stage1, ignore=shutil.ignore_patterns("work"))
    shutil.copytree(stage2_reference, stage2, ignore=shutil.ignore_patterns("work"))
    for folder in (stage1, stage2, stage2 / "probe"):
        plant_malicious_files(folder, marker)
    assert cli("tokenize", "audio", audio, "--tokenizer", stage1).exit_code == 0
    assert cli("tokenize", "text", "Naku gabu.", "--model", stage2, "--max-seconds", "1").exit_code == 0

    # the same folders with their safetensors removed: refused clearly, no pickle fallback
    for folder, args in ((stage1, ["tokenize", "audio", audio, "--tokenizer", stage1]),
                         (stage2, ["tokenize", "text", "Naku.", "--model", stage2])):
        for weights in folder.glob("model*.safetensors"):
            weights.unlink()
        result = cli(*args)
        assert result.exit_code == 2 and "model.safetensors: file not found" in one_error_line(result)

    # an encoder or a stage-2 backbone folder holding only pickled weights
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "gemma4_audio", "hidden_size": 32, "num_hidden_layers": 2,
                                                      "num_attention_heads": 2, "subsampling_conv_channels": [128, 8]}))
    plant_malicious_files(encoder, marker)
    result = cli(*set_args("stage1", "train", settings=stage1_overrides(corpus, encoder, tmp_path / "run1", tmp_path / "store",
                                                                         f"encoder.source={encoder}")))
    assert result.exit_code == 1 and "model.safetensors" in one_error_line(result)
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "config.json").write_text((stage2_base / "backbone.json").read_text())
    plant_malicious_files(backbone, marker)
    result = cli(*set_args("stage2", "train", settings=stage2_overrides(
        stage2_base, tmp_path / "run2", f"model.backbone={backbone}", f"model.tokenizer={stage2_reference / 'tokenizer.json'}")))
    assert result.exit_code == 2 and "model.backbone" in one_error_line(result) and "model.safetensors" in result.stderr

    # store: a local push refuses them; a Hub version holding them is refused on download
    result = cli("hub", "push", stage2, "--stage", "stage2", "--store-root", tmp_path / "store")
    assert result.exit_code == 2 and "refusing to push pickles or code" in one_error_line(result)
    assert marker.exists() is False


def test_hub_version_with_pickles_is_refused_on_download(tmp_path, monkeypatch, cli):
    from huggingface_hub import constants as hf_constants

    marker = tmp_path / "PWNED"
    planted = tmp_path / "planted"
    planted.mkdir()
    plant_malicious_files(planted, marker)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    files = {"model.safetensors": b"\x00" * 16, **{p.name: p.read_bytes() for p in planted.iterdir()}}
    build_cache(cache, REPO, {"v1": files})
    result = cli("hub", "download", "stage1@v1", "--to", tmp_path / "dl", "--backend", "hub", "--hub-namespace", NS)
    assert result.exit_code == 2 and "holds pickles or code" in one_error_line(result)
    assert not (tmp_path / "dl").exists() and not marker.exists()


# --------------------------------------------------------------------------------------------------- path traversal

def test_manifest_split_cannot_write_outside_the_run_folder(corpus, encoder_json, tmp_path, cli):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    for row in rows:
        row["audio_filepath"] = str(corpus.parent / row["audio_filepath"])
        if row["split"] == "test":
            row["split"] = "../../escaped"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli(*set_args("stage1", "train", settings=stage1_overrides(manifest, encoder_json, tmp_path / "a" / "b" / "run", tmp_path / "store")))
    assert result.exit_code == 2 and "field 'split'" in one_error_line(result)
    assert not list(tmp_path.rglob("escaped*")) and not (tmp_path / "a").exists()


def test_hub_file_paths_cannot_escape_the_download_folder(tmp_path):
    from speechless.core.errors import UsageError
    from speechless.core.store.base import _copy_out

    (tmp_path / "src").mkdir()
    with pytest.raises(UsageError, match="outside the version's folder"):
        _copy_out(tmp_path / "src", ["ok.json", "../../evil.json"], tmp_path / "dl", None, "stage1@v1")
    assert not (tmp_path / "dl").exists() and not list(tmp_path.rglob("evil.json"))


# ---------------------------------------------------------------------------------------- disk full, read-only folder

def fail_writes(monkeypatch, matches: str, error: int) -> None:
    """The file system fails for files whose path contains `matches`: ENOSPC half-way through the write (the temp file
    is cut to half its bytes when it is flushed, as a full disk does), or EROFS when the file is created."""
    import tempfile

    real_fsync, real_mkstemp = os.fsync, tempfile.mkstemp

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if error == errno.ENOSPC and matches in path:
            os.truncate(path, os.fstat(fd).st_size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    def mkstemp(*args, **kwargs):
        if error == errno.EROFS and matches in str(kwargs.get("dir", "")) + str(kwargs.get("prefix", "")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("error, culprit", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")])
def test_checkpoint_write_fails_cleanly_and_a_rerun_completes(error, culprit, stage1_trained, corpus, encoder_json, tmp_path, cli,
                                                              monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(stage1_trained / "work" / "features", run / "work" / "features")
    args = set_args("stage1", "train", settings=stage1_overrides(corpus, encoder_json, run, tmp_path / "store"))
    with monkeypatch.context() as patch:
        fail_writes(patch, "step-000004", error)
        result = cli(*args)
    assert result.exit_code == 1, result.stderr
    message = one_error_line(result)
    assert "step-000004.safetensors" in message and culprit in message
    state = json.loads((run / "work" / "state.json").read_text())
    assert state["step"] == 2 and sorted(p.name for p in (run / "work" / "checkpoints").iterdir()) == ["step-000000.safetensors", "step-000002.safetensors"]
    assert not list(run.rglob("*.tmp")), "half-written temp file left behind"
    result = cli(*args)  # the fault cleared: resumes from step 2
    assert result.exit_code == 0, result.stderr
    assert (run / "model.safetensors").read_bytes() == (stage1_trained / "model.safetensors").read_bytes()


def test_read_only_download_folder(stage2_base, tmp_path, cli, monkeypatch):
    with monkeypatch.context() as patch:
        fail_writes(patch, str(tmp_path / "ro"), errno.EROFS)
        patch.setattr(os, "mkdir", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS))))
        result = cli("hub", "download", "stage1@v1", "--to", tmp_path / "ro" / "dl", "--store-root", stage2_base / "store")
    assert result.exit_code == 1 and "Read-only file system" in one_error_line(result)
    assert not (tmp_path / "ro").exists()


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the tensor bytes: safetensors still parses the file
    path.write_bytes(bytes(data))


def test_damaged_feature_shard_is_extracted_again_and_damaged_resume_checkpoint_refused(stage1_trained, corpus, encoder_json,
                                                                                         tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(stage1_trained / "work" / "features", run / "work" / "features")
    shard = run / "work" / "features" / "train" / "shard-00001.safetensors"
    flip_last_byte(shard)
    args = set_args("stage1", "train", settings=stage1_overrides(corpus, encoder_json, run, tmp_path / "store"))
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "shard-00001.safetensors: damaged feature shard" in " ".join(result.stderr.split())
    assert shard.read_bytes() == (stage1_trained / "work" / "features" / "train" / "shard-00001.safetensors").read_bytes()
    assert (run / "model.safetensors").read_bytes() == (stage1_trained / "model.safetensors").read_bytes()
    assert oct((run / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())  # not mkstemp's 0o600

    # a resume checkpoint damaged after it was written: never resumed from
    state = json.loads((run / "work" / "state.json").read_text())
    state["step"] = 4
    (run / "work" / "state.json").write_text(json.dumps(state))
    checkpoint = run / "work" / "checkpoints" / "step-000004.safetensors"
    flip_last_byte(checkpoint)
    (run / "model.safetensors").unlink()
    result = cli(*args)
    assert result.exit_code == 1 and "step-000004.safetensors: sha256 differs" in one_error_line(result)
    assert not (run / "model.safetensors").exists()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------- Hub failures and the HF token

@pytest.mark.parametrize("failure", [401, 403, 404, 429, 500, 503, "timeout"])
def test_failed_push_then_retry_succeeds_and_the_token_is_never_written(failure, fake_hub, stage1_trained, corpus, encoder_json,
                                                                        tmp_path, cli, caplog):
    """HF_TOKEN is the sentinel FAKE_TOKEN (fake_hub sets it). Train with --push to a Hub that fails, then push again."""
    import logging

    caplog.set_level(logging.DEBUG)
    run = tmp_path / "run"
    shutil.copytree(stage1_trained / "work" / "features", run / "work" / "features")
    fake_hub.failures["commit" if failure != 401 else "create"] = failure
    args = set_args("stage1", "train", "--push", settings=stage1_overrides(corpus, encoder_json, run, tmp_path / "store",
                                                                            "store.backend=hub", f"store.hub_namespace={NS}"))
    failed = cli(*args)
    assert failed.exit_code == (2 if failure in (401, 403, 404) else 1), failed.stderr
    message = one_error_line(failed)
    assert REPO in message and ("retry the push" in message or "HF_TOKEN" in message or "not found" in message)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert (run / "model.safetensors").is_file() and not fake_hub.repos.get(REPO, {}).get("tags")
    fake_hub.failures.clear()
    retried = cli("hub", "push", run, "--stage", "stage1", "--backend", "hub", "--hub-namespace", NS)
    assert retried.exit_code == 0, retried.stderr
    assert retried.stdout.split()[0] == "stage1@v1"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # local state untouched by both
    pushed = fake_hub.repos[REPO]["commits"][fake_hub.repos[REPO]["tags"]["v1"]]["files"]
    assert pushed["model.safetensors"] == (run / "model.safetensors").read_bytes()
    for text in (failed.stdout, failed.stderr, retried.stdout, retried.stderr, caplog.text):
        assert FAKE_TOKEN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    for blob in pushed.values():
        assert FAKE_TOKEN.encode() not in blob



def test_hub_rejecting_the_model_card_is_one_line(fake_hub, stage1_trained, tmp_path, cli):
    fake_hub.failures["validate_yaml"] = 400
    result = cli("hub", "push", stage1_trained, "--stage", "stage1", "--backend", "hub", "--hub-namespace", NS)
    assert result.exit_code == 2 and "rejected the metadata of README.md" in one_error_line(result)
    assert not fake_hub.commit_requests()
