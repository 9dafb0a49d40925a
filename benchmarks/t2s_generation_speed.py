"""Stage 2 generation speed: frames per second with and without the KV cache, one text at a time and batched.

Greedy decoding of the same held-out texts in every setting (the outputs are checked to be identical, so every
setting produces the same frames); frames/s = generated frames / wall time. Prints a markdown table and writes JSON.

    python benchmarks/t2s_generation_speed.py --model runs/stage2_dev/demo --stage1 runs/stage2_dev/stage1 --texts 32
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def measure(model, ids: list[list[int]], batch: int, use_cache: bool, max_frames: int) -> tuple[float, int, list]:
    outputs = []
    started = time.perf_counter()
    for start in range(0, len(ids), batch):
        codes, _ = model.generate(ids[start:start + batch], max_frames=max_frames, use_cache=use_cache)
        outputs.extend(codes)
    seconds = time.perf_counter() - started
    return seconds, sum(c.shape[1] for c in outputs), outputs


def compare_settings(model, ids: list[list[int]], batch: int, max_frames: int, measure_fn=None) -> list[dict]:
    """Greedy generation of `ids` with/without KV cache, one at a time and `batch` at a time; one row per setting.

    `measure_fn(callable) -> (result, extra)` may wrap each timed run (the bench runner samples peak memory there)."""
    import torch

    measure(model, ids[:2], 2, True, max_frames)  # warm-up
    rows, reference = [], None
    for size, use_cache in ((1, True), (1, False), (batch, True), (batch, False)):
        run = lambda: measure(model, ids, size, use_cache, max_frames)  # noqa: B023 (called within the same iteration)
        (seconds, frames, outputs), extra = measure_fn(run) if measure_fn else (run(), {})
        if reference is None:
            reference = outputs
        same = all(torch.equal(a, b) for a, b in zip(outputs, reference))
        rows.append({"batch": size, "kv_cache": use_cache, "texts": len(ids), "frames": frames, "seconds": round(seconds, 2),
                     "frames_per_second": round(frames / seconds, 1), "identical_to_batch1_cache": same, **extra})
        print(f"batch {size:3d} cache {str(use_cache):5s}: {frames} frames in {seconds:.2f} s = {frames / seconds:.1f} frames/s "
              f"(identical: {same})", file=sys.stderr)
    return rows


def main() -> None:
    import torch

    from speechless.speech.tokens import read_token_jsonl
    from speechless.t2s.model import T2SModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="stage-2 run folder")
    parser.add_argument("--stage1", required=True, help="stage-1 run folder (texts of its test split)")
    parser.add_argument("--texts", type=int, default=32, help="distinct held-out sentences to generate")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = T2SModel.load(args.model)
    texts = []
    for row in read_token_jsonl(Path(args.stage1) / "tokens" / "test.jsonl"):
        if row["text"] not in texts:
            texts.append(row["text"])
    texts = texts[: args.texts]
    ids = [model.text.encode(t).chunks[0] for t in texts]
    max_frames = int(args.max_seconds * 25)
    rows = compare_settings(model, ids, args.batch, max_frames)
    params = sum(p.numel() for p in model.parameters())
    info = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
            "model": {"folder": args.model, "parameters": params, "frame_mode": model.cfg.frame_mode,
                      "hidden": model.hidden, "layers": model.lm.config.num_hidden_layers}, "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2) + "\n")
    print("| batch | KV cache | texts | frames | seconds | frames/s | same output |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {'yes' if r['kv_cache'] else 'no'} | {r['texts']} | {r['frames']} | {r['seconds']} | "
              f"{r['frames_per_second']} | {'yes' if r['identical_to_batch1_cache'] else 'NO'} |")


if __name__ == "__main__":
    main()
