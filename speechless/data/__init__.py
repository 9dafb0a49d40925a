"""Corpora and manifests (before any stage): reading audio, the JSONL manifest, the espeak-ng demo corpus, Hugging
Face dataset import, the UDHR texts. Imports only `core`.

`speechless.data.manifest` is imported here; `speechless.data.synth` and `speechless.data.hf_import` are imported on
use (the latter pulls in `datasets`).
"""

from speechless.data.manifest import (
    MANIFEST_FIELDS,
    ManifestEntry,
    Problem,
    manifest_sha256,
    read_manifest,
    summarize,
    validate_manifest,
    write_manifest,
)

__all__ = [
    "MANIFEST_FIELDS",
    "ManifestEntry",
    "Problem",
    "manifest_sha256",
    "read_manifest",
    "summarize",
    "validate_manifest",
    "write_manifest",
]
