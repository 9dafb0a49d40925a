"""Errors the CLI turns into one clear line and an exit code.

`UsageError` (exit 2): the user gave something wrong (a config key, a path, a manifest line): say which and what to do.
`RuntimeFailure` (exit 1): the input was valid but the work failed (corrupt file, disk full, network).
"""

from __future__ import annotations


class SpeechlessError(Exception):
    """Base class: the message is a single line naming the culprit and what to do."""

    exit_code = 1


class UsageError(SpeechlessError):
    exit_code = 2


class RuntimeFailure(SpeechlessError):
    exit_code = 1
