"""Which CTC probe is the better judge? Train probe variants on the REAL train tokens of a stage-1 run and report
their CER on the real tokens of a held-out split (nothing else involved: no stage 2).

    python benchmarks/probe_variants.py --stage1 runs/demo/stage1 --variants codes,vectors --steps 400
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from speechless.core.metrics import cer  # noqa: E402
from speechless.speech.rvq import SpeechRVQ  # noqa: E402
from speechless.speech.tokens import read_token_jsonl  # noqa: E402
from speechless.t2s.probe import ProbeConfig, train_probe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1", required=True)
    parser.add_argument("--variants", default="codes,vectors")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.stage1)
    train = read_token_jsonl(folder / "tokens" / "train.jsonl")
    held = read_token_jsonl(folder / "tokens" / f"{args.split}.jsonl")
    books = SpeechRVQ.load(folder).codebooks()
    q, k = books.shape[:2]
    codes = lambda rows: [torch.tensor(r["codes"], dtype=torch.long) for r in rows]  # noqa: E731
    results = []
    for variant in args.variants.split(","):
        cfg = ProbeConfig(input=variant, steps=args.steps, batch_size=args.batch_size)
        tick = time.time()
        probe, summary = train_probe(codes(train), [r["text"] for r in train], cfg, q, k, codebooks=books)
        result = {"variant": variant, "steps": args.steps, "parameters": summary["parameters"],
                  "train_seconds": round(time.time() - tick, 1),
                  "cer_train": round(cer([r["text"] for r in train[:300]], probe.transcribe(codes(train[:300]))), 4),
                  f"cer_{args.split}": round(cer([r["text"] for r in held], probe.transcribe(codes(held))), 4)}
        print(json.dumps(result), flush=True)
        results.append(result)
    print("| probe input | steps | parameters | train s | CER train (300) | CER " + args.split + " |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['steps']} | {r['parameters'] / 1e6:.2f} M | {r['train_seconds']} | {r['cer_train']} | {r[f'cer_{args.split}']} |")


if __name__ == "__main__":
    main()
