"""A trained stage-1 speech tokenizer: the Gemma 4 audio encoder plus the RVQ, loaded from a checkpoint folder.

`SpeechTokenizer.load` takes a local run folder or a store reference (`stage1@v2`), reads `config.json` (the RVQ
settings and the encoder it was trained on) and the weights, rebuilds the encoder, and refuses an encoder whose
weights differ from the ones stage 1 saw (codes would silently mean something else).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from speechless.core import distributed
from speechless.core.errors import UsageError
from speechless.core.io import read_json
from speechless.core.runs import verify_weights
from speechless.core.store import StoreConfig, is_store_ref, open_store
from speechless.data.manifest import ManifestEntry
from speechless.speech.encoders import EncoderConfig, LoadedEncoder, load_encoder
from speechless.speech.features import UtteranceVectors, encode_entries
from speechless.speech.rvq import SpeechRVQ
from speechless.speech.tokens import token_row

WEIGHT_FILES = {"final": "model.safetensors", "best": "model.best.safetensors", "averaged": "model.averaged.safetensors"}


def resolve_checkpoint(ref: str, store_cfg: StoreConfig | None = None) -> Path:
    """A local folder as is; a store reference (`stage1@v2`, `stage1@latest`) downloaded from the store."""
    if Path(ref).is_dir():
        return Path(ref)
    if is_store_ref(ref):
        return open_store(store_cfg).download(ref)
    raise UsageError(f"{ref}: not a checkpoint folder nor a store reference like stage1@v1 (see `speechless hub list`)")


def file_ids(files: Sequence[Path]) -> list[str]:
    """An id for each audio file: its name without extension, or, where two files share that name, its path below the
    folder the files have in common (without extension where that is unique: `a/x`, `b/x`; else with it)."""
    paths = [Path(p).resolve() for p in files]
    stems = [p.stem for p in paths]
    ids = list(stems)
    clashing = [i for i, stem in enumerate(stems) if stems.count(stem) > 1]
    if clashing:
        common = Path(os.path.commonpath([str(paths[i].parent) for i in clashing]))
        relative = {i: paths[i].relative_to(common) for i in clashing}
        bare = {i: relative[i].with_suffix("").as_posix() for i in clashing}
        for i in clashing:
            ids[i] = bare[i] if list(bare.values()).count(bare[i]) == 1 else relative[i].as_posix()
    return ids


def entries_for_files(files: Sequence[Path]) -> list[ManifestEntry]:
    """Bare audio files as manifest entries (no transcript), each with a unique id (`file_ids`)."""
    for path in files:
        if not Path(path).is_file():
            raise UsageError(f"{path}: audio file not found")
    resolved = [Path(p).resolve() for p in files]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise UsageError(f"{twice[0]}: given twice; name each audio file once")
    return [ManifestEntry(id=name, audio_filepath=path, duration=0.0, text="", split="")
            for name, path in zip(file_ids(files), resolved)]


def tokenize_audio(ref: str, files: Sequence[Path] | None = None, manifest: Path | None = None, split: str | None = None,
                   weights: str = "final", device: str | None = None, output: Path | None = None) -> list[dict]:
    """`speechless tokenize audio`: token rows for audio FILES or every utterance of a manifest (one split), with the
    stage-1 tokenizer `ref`; with `output`, also written there as token JSONL (atomically, by rank 0 of a job).
    Under torchrun the utterances are shared among the processes; ranks > 0 return []."""
    from speechless.data.manifest import read_manifest
    from speechless.speech.tokens import write_token_jsonl

    if bool(files) == bool(manifest):
        raise UsageError("give audio FILES or --manifest M (one of them)")
    entries = read_manifest(manifest, splits=[split] if split else None) if manifest else entries_for_files(files)
    job = distributed.setup()
    rows = SpeechTokenizer.load(ref, weights=weights, device=device).tokenize(entries)
    if not job.is_main:
        return []
    if output is not None:
        write_token_jsonl(output, rows)
    return rows


def tokens_from_vectors(rvq: SpeechRVQ, utterances: Sequence[UtteranceVectors], revision: str) -> list[dict]:
    """Quantize every utterance in one batch-invariant call and build its token row."""
    if not utterances:
        return []
    codes = rvq.encode(torch.cat([u.vectors for u in utterances]))
    rows, start = [], 0
    for utterance in utterances:
        end = start + len(utterance.vectors)
        rows.append(token_row(utterance.id, utterance.text, codes[start:end], utterance.windows, rvq.codebook_size, revision))
        start = end
    return rows


@dataclass
class SpeechTokenizer:
    folder: Path
    rvq: SpeechRVQ
    encoder: LoadedEncoder
    encoder_cfg: EncoderConfig
    revision: str
    """sha256 of the weights file: the identity of these codes, recorded in every token row."""

    @classmethod
    def load(cls, ref: str, weights: str = "final", store_cfg: StoreConfig | None = None, device: str | None = None) -> SpeechTokenizer:
        folder = resolve_checkpoint(ref, store_cfg)
        if weights not in WEIGHT_FILES:
            raise UsageError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_FILES)}")
        config = read_json(folder / "config.json")
        if "encoder" not in config:
            raise UsageError(f"{folder / 'config.json'}: no 'encoder' section; this is not a stage-1 speechless checkpoint")
        recorded = dict(config["encoder"])
        expected_revision = recorded.pop("weights_sha256")
        recorded.pop("source_commit", None)
        encoder_cfg = EncoderConfig(**recorded)
        if device is not None:
            encoder_cfg.device = device
        revision = verify_weights(folder / WEIGHT_FILES[weights], weights)
        rvq = SpeechRVQ.load(folder, weights=WEIGHT_FILES[weights])
        encoder = load_encoder(encoder_cfg)
        if encoder.revision != expected_revision:
            raise UsageError(
                f"encoder {encoder_cfg.source}: weights differ from those this tokenizer was trained on "
                f"({encoder.revision[:12]} != {expected_revision[:12]}); use the same encoder checkpoint/seed")
        if encoder.dim != rvq.dim:
            raise UsageError(f"{folder}: checkpoint has dim {rvq.dim}, encoder gives {encoder.dim}")
        return cls(folder, rvq, encoder, encoder_cfg, revision)

    def tokenize(self, entries: Sequence[ManifestEntry]) -> list[dict]:
        """Token rows of `entries`, in their order.

        In a torchrun job each rank encodes every world_size-th entry; rank 0 receives all rows, merged back into input
        order (the other ranks get []). Fixed-shape encoder batches and fixed-chunk RVQ encoding make every row
        independent of which rank or batch computed it, so the result equals a one-process run bit for bit.
        """
        info = distributed.group()
        mine = distributed.shard(list(entries), info)
        rows = tokens_from_vectors(self.rvq, encode_entries(mine, self.encoder, self.encoder_cfg), self.revision)
        if info.world_size == 1:
            return rows
        parts = distributed.gather_json(rows)
        if parts is None:
            return []
        merged: list[dict] = [{}] * len(entries)
        for rank, part in enumerate(parts):
            merged[rank::info.world_size] = part
        return merged


def quantizer_eval(rvq: SpeechRVQ, vectors: torch.Tensor) -> dict:
    """Held-out quality of a quantizer on encoder vectors: MSE, NMSE, cosine, centred cosine, per-level utilization
    and perplexity (`speechless.core.metrics.quantizer_metrics`)."""
    from speechless.core.metrics import quantizer_metrics

    rvq.eval()
    codes = rvq.encode(vectors)
    return quantizer_metrics(vectors, rvq.decode(codes), codes, rvq.codebook_size)


def evaluate_tokenizer(ref: str, manifest: str, split: str, weights: str = "final", device: str | None = None) -> dict:
    """`speechless stage1 eval`: a stage-1 checkpoint's `quantizer_eval` on one split of a manifest (features computed
    in memory)."""
    from speechless.data.manifest import read_manifest

    tokenizer = SpeechTokenizer.load(ref, weights=weights, device=device)
    entries = [e for e in read_manifest(manifest) if e.split == split]
    if not entries:
        raise UsageError(f"{manifest}: no utterances in split '{split}'")
    vectors = torch.cat([u.vectors for u in encode_entries(entries, tokenizer.encoder, tokenizer.encoder_cfg)])
    return {**quantizer_eval(tokenizer.rvq, vectors), "split": split, "frames": len(vectors), "weights": weights}
