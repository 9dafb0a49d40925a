"""Markdown tables of a stage-3 run's metrics.json (the figures in docs/archive/diary.md, section Stage 3).

    python benchmarks/stage3_tables.py runs/demo/stage3/metrics.json [--corpus runs/demo/corpus]

With --corpus, also what the demo's closed tasks score without listening: always the commonest training answer, and
the commonest training answer for the sentence's verb (what a model that hears only the verb can do).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path


def tables(metrics: dict) -> str:
    ev = metrics["eval"]
    variants = ev["variants"]
    tasks = list(next(iter(variants.values()))["speech"])
    out = ["Adapted on stage-2 synthetic speech only vs the real-speech topline (real speech tokens of the same recordings),"
           " held-out real speech (input 'native': the audio tower's vectors; 'stage 1': put through stage 1 at the levels each"
           " model trained on):", "",
           "| adapter | input | task | metric | synthetic speech | real-speech topline | ratio | >= 0.9 |", "|---|---|---|---|---|---|---|---|"]
    for key, label in (("topline_comparison", "native"), ("topline_comparison_quantized", "stage 1")):
        for kind, rows in ev.get(key, {}).items():
            for task, r in rows.items():
                ratio = r["ratio_to_topline"]
                out.append(f"| {kind} | {label} | {task} | {r['metric']} | {r['synthetic_speech']:.4f} | {r['real_speech_topline']:.4f} | "
                           f"{ratio if ratio is not None else '-'} | {'-' if ratio is None else 'yes' if ratio >= 0.9 else 'NO'} |")
    out += ["", "Adapters (scores on held-out real speech; text perplexity on held-out text-only requests, relative change):", "",
            "| variant | " + " | ".join(tasks) + " | text ppl before | after | change | trainable params | train+eval s |",
            "|---" * (len(tasks) + 6) + "|"]
    for name, r in variants.items():
        ppl = r["text_perplexity"]
        out.append(f"| {name} | " + " | ".join(f"{r['speech'][t]['score']:.4f}" for t in tasks)
                   + f" | {ppl['before']} | {ppl['after']} | {ppl['relative_change']:+.4%} | {r['parameters']['trainable']:,} | {r['seconds']} |")
    out += ["", "Detail (A, main adapter): "]
    main = variants[ev["main"]]
    for t, s in main["speech"].items():
        extra = {k: s[k] for k in ("wer", "cer", "bleu", "chrf", "exact_match") if k in s}
        out.append(f"- {t}: {extra}")
    if "speech_quantized" in main:
        out.append("- real vectors quantized through stage 1 first: "
                   + ", ".join(f"{t} {s['score']:.4f}" for t, s in main["speech_quantized"].items()))
    if "text" in main:
        out.append("- the same requests as text: " + ", ".join(f"{t} {s['score']:.4f}" for t, s in main["text"].items()))
    out.append("- text-pretrained base, requests as text: " + ", ".join(f"{t} {s:.4f}" for t, s in ev["base_text_scores"].items()))
    first = main["speech"].get("ast") or next(iter(main["speech"].values()))
    if "bleu_signature" in first:
        out.append(f"- sacrebleu signatures: BLEU `{first['bleu_signature']}`, chrF `{first['chrf_signature']}`")
    out.append(f"- timings: {metrics.get('timings')}")
    return "\n".join(out)


def closed_task_baselines(corpus: Path, held_out: tuple[str, ...] = ("dev", "test")) -> str:
    """Scores of two guessers on the held-out sentences (each is asked once per recording, the same for every one)."""
    sentences = [json.loads(line) for line in (corpus / "sentences.jsonl").read_text().splitlines()]
    out = ["| task | held-out sentences | commonest answer | commonest answer for the verb |", "|---|---|---|---|"]
    for task, field in (("where", "place"), ("who", "subject")):
        train = [s for s in sentences if s["split"] == "train" and s.get(field)]
        test = [s for s in sentences if s["split"] in held_out and s.get(field)]
        overall = Counter(s[field] for s in train).most_common(1)[0][0]
        by_verb = defaultdict(Counter)
        for s in train:
            by_verb[s["verb"]][s[field]] += 1
        guess = lambda s: by_verb[s["verb"]].most_common(1)[0][0] if by_verb[s["verb"]] else overall  # noqa: B023 (used within the iteration)
        out.append(f"| {task} | {len(test)} | {sum(s[field] == overall for s in test) / len(test):.3f} | "
                   f"{sum(s[field] == guess(s) for s in test) / len(test):.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a stage-3 run's metrics.json")
    parser.add_argument("--corpus", type=Path, help="the demo corpus folder (sentences.jsonl): print the closed tasks' guessing baselines")
    args = parser.parse_args()
    print(tables(json.loads(args.metrics.read_text())))
    if args.corpus:
        print("\nWithout listening (held-out dev + test):\n")
        print(closed_task_baselines(args.corpus))
