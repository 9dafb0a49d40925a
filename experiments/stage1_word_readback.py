"""How much of each sentence do a stage-1 version's tokens carry? A CTC probe reads them back.

The probe is the stage-2 judge's recipe (`input: vectors`, 300 steps, as configs/stage2/demo.yaml), trained on the real
tokens of the train split; it reads the held-out split. Printed: CER, the share of reference characters read back in
each third of the sentence, and how often the whole Swahili word the demo's questions ask about comes back: the
subject's first word (who) and the place (where), and the time word. Use it to compare encoder settings before
building stages 2 and 3 on them (docs/archive/diary.md, "what the demo tokens carry").

    python benchmarks/stage1_word_readback.py --stage1 runs/demo/stage1 --sentences runs/demo/corpus/sentences.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from t2s_level_diagnostic import recall_by_third  # noqa: E402

from speechless.core.io import read_jsonl  # noqa: E402
from speechless.core.metrics import cer, probe_text  # noqa: E402
from speechless.data.synth import PLACES, SUBJECTS, TIMES  # noqa: E402
from speechless.speech.tokens import load_split, resolve_stage1, row_codes, stage1_codebooks  # noqa: E402
from speechless.t2s.probe import ProbeConfig, train_probe  # noqa: E402

SWAHILI = {"subject": {s.en: s.sw for s in SUBJECTS}, "place": {en: sw for sw, en in PLACES.values()},
           "time": {en: sw for options in TIMES.values() for sw, en in options if en}}


def role_words(sentence: dict) -> dict[str, str]:
    """The Swahili word of each role the sentence has (the subject's first word)."""
    words = {role: SWAHILI[role].get(sentence.get(role) or "") for role in SWAHILI}
    return {role: probe_text(word).split()[0] for role, word in words.items() if word}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1", required=True, help="stage-1 run folder (with tokens/)")
    parser.add_argument("--sentences", required=True, help="the demo corpus's sentences.jsonl (parts of each sentence)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    stage1 = resolve_stage1(args.stage1)
    sentences = {row["text"]: row for _, row in read_jsonl(args.sentences, "sentences file")}
    train = load_split(stage1, "train")
    began = time.time()
    probe, _ = train_probe([row_codes(r) for r in train], [r["text"] for r in train],
                           ProbeConfig(input="vectors", steps=args.steps, batch_size=32), stage1.num_levels, stage1.codebook_size,
                           codebooks=stage1_codebooks(stage1))
    rows = load_split(stage1, args.split)
    texts = [r["text"] for r in rows]
    heard = probe.transcribe([row_codes(r) for r in rows])
    hits: dict[str, list[int]] = {}
    for text, transcript in zip(texts, heard):
        for role, word in role_words(sentences[text]).items():
            hits.setdefault(role, []).append(word in transcript.split())
    thirds = recall_by_third(texts, heard)
    print(f"| stage 1 | probe CER ({len(rows)} '{args.split}' utterances) | characters read back: first / middle / last third | "
          + " | ".join(f"{role} word read back" for role in hits) + " |")
    print("|---" * (3 + len(hits)) + "|")
    print(f"| {args.stage1} | {cer(texts, heard):.4f} | {' / '.join(f'{v:.3f}' for v in thirds)} | "
          + " | ".join(f"{sum(v) / len(v):.3f} (n {len(v)})" for v in hits.values()) + " |")
    print(f"(probe trained {args.steps} steps in {time.time() - began:.0f} s on {args.threads} threads)", file=sys.stderr)


if __name__ == "__main__":
    main()
