"""Encoder activations for a manifest: extracted in batches, cached in safetensors shards, resumable.

A shard holds the vectors of a fixed, deterministic group of utterances (sorted by duration so each shard's batches
need little padding). Each shard file is written atomically and carries a fingerprint of everything its content
depends on (encoder weights, hook, windowing, batch size, the utterances and their audio files); a re-run skips shards
whose fingerprint matches and recomputes the rest, so an interrupted extraction resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from speechless.core import distributed, log
from speechless.core.errors import RuntimeFailure
from speechless.core.io import save_tensors
from speechless.data.audio import SAMPLE_RATE, load_audio, window_bounds
from speechless.data.manifest import ManifestEntry
from speechless.speech.encoders import AudioWindow, EncoderConfig, LoadedEncoder, encode_windows


@dataclass
class UtteranceVectors:
    id: str
    text: str
    vectors: torch.Tensor  # [frames, dim] float32, padded frames already removed
    windows: list[list[float]]  # [[start_s, end_s, frames], ...], one per encoder window


def encode_entries(entries: Sequence[ManifestEntry], encoder: LoadedEncoder, cfg: EncoderConfig) -> list[UtteranceVectors]:
    """Decode, window and encode utterances (in memory, no cache): the one path both stage 1 and `tokenize` use."""
    windows: list[AudioWindow] = []
    bounds: list[list[tuple[int, int]]] = []
    for position, entry in enumerate(entries):
        audio = load_audio(entry.audio_filepath)
        spans = window_bounds(len(audio), cfg.max_window_s)
        bounds.append(spans)
        windows.extend(AudioWindow((position, index), audio[start:end]) for index, (start, end) in enumerate(spans))
    outputs = dict(encode_windows(encoder, windows, cfg))
    results = []
    for position, entry in enumerate(entries):
        parts = [outputs[(position, index)] for index in range(len(bounds[position]))]
        spans = [[start / SAMPLE_RATE, end / SAMPLE_RATE, len(part)] for (start, end), part in zip(bounds[position], parts)]
        results.append(UtteranceVectors(entry.id, entry.text, torch.cat(parts), spans))
    return results


def _fingerprint(base: str, entries: Sequence[ManifestEntry]) -> str:
    digest = hashlib.sha256(base.encode())
    for entry in entries:
        path = Path(entry.audio_filepath)
        stat = path.stat()
        digest.update(f"{entry.id}\0{entry.text}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def encoder_fingerprint(encoder: LoadedEncoder, cfg: EncoderConfig) -> str:
    settings = {"encoder": encoder.revision, "hook": cfg.hook_module, "window_s": cfg.max_window_s,
                "batch_size": cfg.batch_size, "bucket_s": cfg.length_bucket_s, "dtype": cfg.dtype}
    if cfg.kind != "gemma4":  # the Gemma 4 key stays as it was: its cached shards stay valid
        settings.update(kind=cfg.kind, pad_s=cfg.whisper_pad_s)
    return json.dumps(settings, sort_keys=True)


def plan_shards(entries: Sequence[ManifestEntry], shard_size: int) -> list[list[ManifestEntry]]:
    ordered = sorted(entries, key=lambda e: (e.duration, e.id))
    return [ordered[i:i + shard_size] for i in range(0, len(ordered), shard_size)]


def _content_sha256(vectors: torch.Tensor, offsets: torch.Tensor) -> str:
    return hashlib.sha256(vectors.contiguous().numpy().tobytes() + offsets.contiguous().numpy().tobytes()).hexdigest()


def _shard_is_current(path: Path, fingerprint: str) -> bool:
    """True when the shard was made from the same inputs and its tensors still match their recorded sha256
    (a damaged shard is extracted again rather than trained on)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                return False
            intact = _content_sha256(handle.get_tensor("vectors"), handle.get_tensor("offsets")) == meta.get("content_sha256")
    except Exception:  # a corrupt or foreign file is simply recomputed
        intact = False
    if not intact:
        log.warn(f"{path}: damaged feature shard (unreadable or content sha256 differs); extracting it again")
    return intact


def extract_to_cache(entries: Sequence[ManifestEntry], encoder: LoadedEncoder, cfg: EncoderConfig, cache_dir: Path,
                     shard_size: int, rank: int | None = None, world_size: int | None = None) -> list[Path]:
    """Extract every shard this rank owns (shard i belongs to rank i % world_size); return all shard paths in order.

    rank / world_size default to this process's place in the joined process group (`speechless.core.distributed`); in a job every
    rank waits at a barrier until all shards are written, so every rank may read all of them afterwards (the cache
    folder must then be on a filesystem all ranks share).
    """
    info = distributed.group()
    rank = info.rank if rank is None else rank
    world_size = info.world_size if world_size is None else world_size
    cache_dir.mkdir(parents=True, exist_ok=True)
    base = encoder_fingerprint(encoder, cfg)
    shards = plan_shards(entries, shard_size)
    paths = [cache_dir / f"shard-{i:05d}.safetensors" for i in range(len(shards))]
    todo = [i for i in range(len(shards)) if i % world_size == rank and not _shard_is_current(paths[i], _fingerprint(base, shards[i]))]
    if len(todo) < len(shards):
        log.info(f"features: {len(shards) - len(todo)} of {len(shards)} shards already cached in {cache_dir}")
    with log.progress() as bar:
        task = bar.add_task("extracting features", total=sum(len(shards[i]) for i in todo))
        for i in todo:
            utterances = encode_entries(shards[i], encoder, cfg)
            offsets = torch.tensor([0] + [len(u.vectors) for u in utterances]).cumsum(0)
            vectors = torch.cat([u.vectors for u in utterances])
            metadata = {
                "fingerprint": _fingerprint(base, shards[i]),
                "content_sha256": _content_sha256(vectors, offsets),
                "ids": json.dumps([u.id for u in utterances], ensure_ascii=False),
                "texts": json.dumps([u.text for u in utterances], ensure_ascii=False),
                "windows": json.dumps([u.windows for u in utterances]),
            }
            save_tensors(paths[i], {"vectors": vectors, "offsets": offsets}, metadata)
            bar.advance(task, len(shards[i]))
    distributed.barrier()
    return paths


def read_shard(path: Path) -> Iterator[UtteranceVectors]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            vectors, offsets = handle.get_tensor("vectors"), handle.get_tensor("offsets").tolist()
    except Exception as exc:
        raise RuntimeFailure(f"{path}: corrupt feature shard ({exc}); delete it and re-run to re-extract") from exc
    ids, texts, windows = json.loads(meta["ids"]), json.loads(meta["texts"]), json.loads(meta["windows"])
    for k, utt_id in enumerate(ids):
        yield UtteranceVectors(utt_id, texts[k], vectors[offsets[k]:offsets[k + 1]], windows[k])


def read_cache(paths: Sequence[Path]) -> list[UtteranceVectors]:
    return [utterance for path in paths for utterance in read_shard(path)]
