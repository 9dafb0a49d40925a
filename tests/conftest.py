"""Shared test fixtures."""

from __future__ import annotations

from typing import NamedTuple

import pytest


class Result(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run the `speechless` CLI in-process: `cli("data", "validate", path)` -> Result(exit_code, stdout, stderr).

    Arguments are converted with str(); output captured before the call is discarded.
    """
    from speechless.cli import run

    def invoke(*args) -> Result:
        capsys.readouterr()
        code = run([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke
