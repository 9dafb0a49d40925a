"""`make bench`: this project's paths side by side with the plain public recipes, measured in the same run.

Sections (each prints a markdown table: both sides, their ratio, peak memory; all results also go to --out as JSON):

1. tokenize  audio -> codes: `SpeechTokenizer.tokenize` (fixed-shape batched encoder + fast RVQ encode) vs the public
             Twi model card's recipe (one utterance at a time, forward hook on `output_proj`, `ResidualVQ` forward);
             audio seconds per wall second, and whether both give the same codes.
2. encode    RVQ vectors -> codes: `SpeechRVQ.encode` vs `ResidualVQ.forward`, vectors/s, and as a share of this
             machine's plain fp32 matmul throughput for the same FLOPs (the roofline).
3. train     RVQ training: `SpeechRVQ.train_step` (EMA) vs a bare `ResidualVQ` training forward, vectors/s.
4. generate  stage 2: frames/s with KV cache vs recompute, batched vs one text at a time
             (benchmarks/t2s_generation_speed.py).
5. stage3    stage-3 training: `train_loop` (what `speechless stage3 train` runs) vs a plain `transformers.Trainer` +
             peft on the same tiny Gemma 4, LoRA, conversations and steps; non-pad tokens/s (benchmarks/stage3_training.py).

Peak memory = the highest resident set size (sampled every 2 ms) above the size when the side started. The load
average (1 min) is recorded before and after each section: on a shared machine the timings move with it.

    python benchmarks/run.py --stage1 runs/demo/stage1 --corpus runs/demo/corpus/all.jsonl --stage2 runs/stage2/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _measure import alternate, encode_comparison, load_average, machine, residual_vq_from, table, timed  # noqa: E402  (benchmarks/ is on the path)

SECTIONS = ("tokenize", "encode", "train", "generate", "stage3")


# ------------------------------------------------------------------------------------------------------ baselines

def model_card_tokenize(tokenizer, plain_rvq, entries) -> list:
    """The public Twi card's recipe: per utterance, features -> encoder with a hook on output_proj -> ResidualVQ."""
    import torch

    from speechless.data.audio import SAMPLE_RATE, load_audio

    encoder = tokenizer.encoder
    captured = []
    hook = encoder.model.get_submodule(tokenizer.encoder_cfg.hook_module).register_forward_hook(
        lambda _m, inputs, _o: captured.append(inputs[0]))
    codes = []
    try:
        for entry in entries:
            features = encoder.feature_extractor([load_audio(entry.audio_filepath)], sampling_rate=SAMPLE_RATE, return_tensors="pt")
            captured.clear()
            with torch.no_grad():
                output = encoder.model(features["input_features"].to(encoder.device, encoder.dtype),
                                       attention_mask=features["input_features_mask"].to(encoder.device))
                vectors = captured[0][0][output.attention_mask[0]].float().cpu()
                # our codebooks live in standardised units: the same (x - mean) / std the checkpoint records
                _, indices, _ = plain_rvq(tokenizer.rvq.standardize(vectors).unsqueeze(0))
            codes.append(indices[0])
    finally:
        hook.remove()
    return codes


# ------------------------------------------------------------------------------------------------------- sections

def bench_tokenize(args, report: dict) -> str:
    import torch

    from speechless.data.manifest import read_manifest
    from speechless.speech.tokenizer import SpeechTokenizer

    entries = [e for e in read_manifest(args.corpus) if e.split == args.split][: args.utterances]
    tokenizer = SpeechTokenizer.load(str(args.stage1))
    plain = residual_vq_from(tokenizer.rvq)
    audio_s = sum(e.duration for e in entries)
    tokenizer.tokenize(entries[:2]), model_card_tokenize(tokenizer, plain, entries[:1])  # warm-up
    sides = {"ours": lambda: tokenizer.tokenize(entries), "card": lambda: model_card_tokenize(tokenizer, plain, entries)}
    runs = alternate(sides, args.rounds)
    (rows_ours, ours), (codes_card, card) = runs["ours"], runs["card"]
    same_frames = total = 0
    for row, theirs in zip(rows_ours, codes_card):
        mine = torch.tensor(row["codes"]).t()
        total += len(mine)
        if mine.shape == theirs.shape:
            same_frames += int((mine == theirs).all(1).sum())
    ours_rate = audio_s / ours["seconds"]
    ratio = ours_rate / (audio_s / card["seconds"])
    result = {"utterances": len(entries), "audio_seconds": round(audio_s, 1), "frames": total, "rounds": args.rounds,
              "ours": {**ours, "audio_s_per_s": round(ours_rate, 2)},
              "model_card": {**card, "audio_s_per_s": round(audio_s / card["seconds"], 2)},
              "speedup": round(ratio, 2), "target": 3.0, "identical_frames": round(same_frames / max(total, 1), 4),
              "encoder": tokenizer.encoder_cfg.source, "encoder_batch": tokenizer.encoder_cfg.batch_size}
    report["tokenize"] = result
    return (f"### 1. Tokenizing audio ({len(entries)} utterances, {audio_s:.0f} s of audio, encoder {tokenizer.encoder_cfg.source}; "
            f"fastest of {args.rounds} alternating rounds)\n\n"
            + table(["path", "wall s", "audio s / wall s", "peak MiB"],
                    [["ours: `SpeechTokenizer.tokenize` (batched, fixed shapes)", f"{ours['seconds']:.1f}", f"{ours_rate:.1f}", ours["peak_mib"]],
                     ["model card: one utterance at a time + `ResidualVQ`", f"{card['seconds']:.1f}", f"{audio_s / card['seconds']:.1f}", card["peak_mib"]]])
            + f"\n\nspeedup **{ratio:.2f}x** (target >= 3x); identical codes on {100 * same_frames / max(total, 1):.2f} % of {total} frames\n")


def _features(args, dim: int, n: int):
    """n real encoder vectors from the stage-1 run's feature cache (dev split), else None."""
    import torch

    from speechless.speech.features import read_cache

    shards = sorted((Path(args.stage1) / "work" / "features" / "dev").glob("shard-*.safetensors"))
    if not shards:
        return None
    vectors = torch.cat([u.vectors for u in read_cache(shards)])
    return vectors[:n] if vectors.shape[1] == dim and len(vectors) >= n else None


def bench_encode(args, report: dict) -> str:
    import torch

    from speechless.speech.rvq import SpeechRVQ

    rvq = SpeechRVQ.load(args.stage1)
    x = _features(args, rvq.dim, args.vectors)
    source = "dev-split features of the stage-1 run"
    if x is None:
        x = torch.randn(args.vectors, rvq.dim, generator=torch.Generator().manual_seed(0)) * rvq.std + rvq.mean
        source = "random vectors with the run's mean/std"
    result = {**encode_comparison(rvq, x, args.rounds), "source": source, "rounds": args.rounds, "target_share": 0.6}
    n, chunk, flop_per_vector, identical = result["vectors"], result["chunk"], result["flop_per_vector"], result["identical_rows"]
    ours, theirs, roof = result["ours"], result["residualvq"], result["roofline"]
    ours_rate, theirs_rate, roof_rate = ours["vectors_per_s"], theirs["vectors_per_s"], roof["vectors_per_s"]
    report["encode"] = result
    return (f"### 2. RVQ encoding ({n} vectors, {source}; {rvq.num_quantizers} x {rvq.codebook_size} on {rvq.dim}-d; "
            f"{flop_per_vector / 1e6:.1f} MFLOP per vector; fastest of {args.rounds} alternating rounds)\n\n"
            + table(["path", "vectors/s", "GFLOP/s", "share of roofline", "peak MiB"],
                    [["ours: `SpeechRVQ.encode`", round(ours_rate), result["ours"]["gflops"], f"{ours_rate / roof_rate:.0%}", ours["peak_mib"]],
                     ["`ResidualVQ.forward` (eval)", round(theirs_rate), result["residualvq"]["gflops"], f"{theirs_rate / roof_rate:.0%}", theirs["peak_mib"]],
                     [f"roofline: plain fp32 matmul ({chunk} x {rvq.dim}) @ ({rvq.dim} x {rvq.codebook_size})", round(roof_rate),
                      result["roofline"]["gflops"], "100%", roof["peak_mib"]]])
            + f"\n\nours / ResidualVQ **{ours_rate / theirs_rate:.2f}x**; ours at **{ours_rate / roof_rate:.0%}** of the roofline "
              f"(target >= 60 %); identical codes on {100 * identical:.2f} % of rows\n")


def bench_train(args, report: dict) -> str:
    import torch

    from speechless.speech.rvq import SpeechRVQ

    rvq = SpeechRVQ.load(args.stage1)
    plain = residual_vq_from(rvq).train()
    for layer in plain.layers:  # the same dead-code threshold SpeechRVQ scales to the batch
        layer._codebook.threshold_ema_dead_code = rvq.cfg.dead_code_threshold * args.train_batch / rvq.codebook_size
    x = _features(args, rvq.dim, args.train_batch)
    if x is None:
        x = torch.randn(args.train_batch, rvq.dim, generator=torch.Generator().manual_seed(0)) * rvq.std + rvq.mean
    z = rvq.standardize(x).unsqueeze(0)

    def ours_steps() -> None:
        for _ in range(args.train_steps):
            rvq.train_step(x)

    def plain_steps() -> None:
        with torch.no_grad():
            for _ in range(args.train_steps):
                plain(z)

    torch.manual_seed(0)
    _, ours = timed(ours_steps)
    torch.manual_seed(0)
    _, theirs = timed(plain_steps)
    vectors = args.train_steps * args.train_batch
    result = {"batch": args.train_batch, "steps": args.train_steps,
              "ours": {**ours, "vectors_per_s": round(vectors / ours["seconds"])},
              "residualvq": {**theirs, "vectors_per_s": round(vectors / theirs["seconds"])},
              "ratio": round(theirs["seconds"] / ours["seconds"], 2)}
    report["train"] = result
    return (f"### 3. RVQ training ({args.train_steps} steps x {args.train_batch} vectors, EMA codebooks)\n\n"
            + table(["path", "vectors/s", "s per step", "peak MiB"],
                    [["ours: `SpeechRVQ.train_step` (standardise, loss terms, dead-code scaling)", result["ours"]["vectors_per_s"],
                      f"{ours['seconds'] / args.train_steps:.2f}", ours["peak_mib"]],
                     ["bare `ResidualVQ` training forward", result["residualvq"]["vectors_per_s"],
                      f"{theirs['seconds'] / args.train_steps:.2f}", theirs["peak_mib"]]])
            + f"\n\nours / bare ResidualVQ: {result['ratio']:.2f}x\n")


def with_threads(threads: int, section, args, report: dict) -> str:
    """Run a section at `threads` torch threads (then restore): small per-step ops on shared cores lose more to
    thread hand-offs than a second thread gains."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return section(args, report)
    finally:
        torch.set_num_threads(before)


def bench_generate(args, report: dict) -> str:
    return with_threads(args.gen_threads, _generate, args, report)


def _generate(args, report: dict) -> str:
    from t2s_generation_speed import compare_settings

    from speechless.speech.tokens import read_token_jsonl
    from speechless.t2s.model import T2SModel

    model = T2SModel.load(args.stage2)
    texts: list[str] = []
    for row in read_token_jsonl(Path(args.stage1) / "tokens" / "test.jsonl"):
        if row["text"] not in texts:
            texts.append(row["text"])
    ids = [model.text.encode(t).chunks[0] for t in texts[: args.texts]]

    def with_peak_memory(run):
        result, stats = timed(run)
        return result, {"peak_mib": stats["peak_mib"]}

    rows = compare_settings(model, ids, args.gen_batch, int(args.gen_seconds * 25), measure_fn=with_peak_memory)
    base = rows[0]["frames_per_second"]
    report["generate"] = {"model": str(args.stage2), "parameters": sum(p.numel() for p in model.parameters()),
                          "threads": args.gen_threads, "rows": rows}
    return (f"### 4. Stage-2 generation ({len(ids)} texts, greedy, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
            f"parameters, `{args.stage2}`, {args.gen_threads} thread(s))\n\n"
            + table(["batch", "KV cache", "frames", "seconds", "frames/s", "vs batch 1 + cache", "same output", "peak MiB"],
                    [[r["batch"], "yes" if r["kv_cache"] else "no", r["frames"], r["seconds"], r["frames_per_second"],
                      f"{r['frames_per_second'] / base:.2f}x", "yes" if r["identical_to_batch1_cache"] else "NO", r["peak_mib"]]
                     for r in rows]) + "\n")


def bench_stage3(args, report: dict) -> str:
    from stage3_training import run

    return with_threads(args.stage3_threads, run, args, report)


BENCHES = {"tokenize": bench_tokenize, "encode": bench_encode, "train": bench_train, "generate": bench_generate,
           "stage3": bench_stage3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", type=Path, default=Path("runs/demo/stage1"), help="stage-1 run folder (with work/features)")
    parser.add_argument("--corpus", type=Path, default=Path("runs/demo/corpus/all.jsonl"), help="manifest of the audio to tokenize")
    parser.add_argument("--split", default="test", help="manifest split to tokenize")
    parser.add_argument("--utterances", type=int, default=48, help="utterances to tokenize (both sides)")
    parser.add_argument("--vectors", type=int, default=16384, help="vectors to encode")
    parser.add_argument("--rounds", type=int, default=2, help="tokenize/encode: alternating turns per side (the fastest counts)")
    parser.add_argument("--train-batch", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--stage2", type=Path, default=Path("runs/stage2/demo"), help="stage-2 run folder")
    parser.add_argument("--texts", type=int, default=8, help="texts to generate in the stage-2 section")
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--gen-threads", type=int, default=1, help="torch threads for the stage-2 section")
    parser.add_argument("--gen-seconds", type=float, default=10.0, help="cap on generated speech per text")
    parser.add_argument("--stage3-conversations", type=int, default=256, help="stage-3 section: demo conversations trained on")
    parser.add_argument("--stage3-steps", type=int, default=32, help="stage-3 section: optimizer steps (whole epochs)")
    parser.add_argument("--stage3-batch", type=int, default=16, help="stage-3 section: conversations per step (the demo's)")
    parser.add_argument("--stage3-lr", type=float, default=3e-3, help="stage-3 section: learning rate (the demo's)")
    parser.add_argument("--stage3-warmup", type=int, default=4, help="stage-3 section: warmup steps")
    parser.add_argument("--stage3-threads", type=int, default=1,
                        help="torch threads for the stage-3 section (measured on the 2 shared cores: 2 threads ran 2-9x slower than 1)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/results.json"))
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")

    report: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average": {}}
    print(f"machine: {report['machine']}\n")
    needs = {"tokenize": [args.stage1, args.corpus], "encode": [args.stage1], "train": [args.stage1],
             "generate": [args.stage1, args.stage2], "stage3": [args.stage1, args.corpus]}
    for name in chosen:
        missing = [str(p) for p in needs[name] if not Path(p).exists()]
        if missing:
            print(f"### {name}\n\nskipped: {', '.join(missing)} not found (run `make demo` or pass the paths)\n", flush=True)
            report[name] = {"skipped": f"missing {', '.join(missing)}"}
            continue
        before = load_average()
        text = BENCHES[name](args, report)
        report["load_average"][name] = {"before": before, "after": load_average()}
        print(text + f"\nload average (1 min) {before} -> {load_average()} on {os.cpu_count()} cores\n", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
