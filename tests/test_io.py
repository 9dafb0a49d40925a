"""Atomic writes and reproducible safetensors files."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from speechless.core.errors import RuntimeFailure
from speechless.core.io import atomic_path, load_tensors, save_tensors, write_text

SAVE = """
import sys, torch
from speechless.core.io import save_tensors
save_tensors(sys.argv[1], {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([1, 2])},
             {"format": "x", "version": "1", "zeta": "z", "alpha": "a", "mid": "m"})
"""


def test_safetensors_bytes_do_not_depend_on_the_process(tmp_path):
    # safetensors' own metadata order follows a per-process hash seed; ours is sorted, so files hash the same
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", SAVE, str(path)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    assert torch.equal(load_tensors(paths[0])["w"], torch.arange(6.0).reshape(2, 3))


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_disk_full_is_a_runtime_failure_naming_the_file(tmp_path, monkeypatch):
    import os

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(RuntimeFailure, match=r"out.safetensors: write failed \(No space left on device\)"):
        save_tensors(tmp_path / "out.safetensors", {"w": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(100)})
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:60])
    with pytest.raises(RuntimeFailure, match="w.safetensors: corrupt safetensors file"):
        load_tensors(tmp_path / "w.safetensors")
