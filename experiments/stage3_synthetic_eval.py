"""What do stage-3 models hear in stage-2 speech of the HELD-OUT sentences, against their real recordings?

    python experiments/stage3_synthetic_eval.py runs/demo/stage3 [--variants synthetic_speech/lora,real_speech_topline/lora] [--set KEY=VALUE]

Stage 2 speaks every held-out request (in its recording's voice, with the run's generation settings and best-of-n
choice), and each adapter of the run answers it; its stage-3 metrics give the same requests as real speech. Each
model hears the synthetic speech at the codebook levels of its own training speech (`speech_levels`).

Reading it for a task that the synthetic-speech model (A) misses on real speech (B: the real-speech topline):
- A high on synthetic held-out speech: stage 2 says what the task needs on unseen text and A learned to hear it, but
  stage 2 says it unlike real speech (a domain gap).
- A low there too: stage 2 does not say it on unseen text, so there is nothing for A to learn.
- B (trained on real speech) on synthetic speech: whether stage 2's speech carries the cues real speech carries.
  With `--set data.stage2=OTHER` (same stage 1) or `--set data.generate.guidance=W`, this scores another stage 2 or
  other generation settings in minutes, without training a stage-3 model on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch  # noqa: E402

from speechless.core.config import load_config  # noqa: E402
from speechless.core.io import read_jsonl  # noqa: E402
from speechless.llm.adapt import evaluate, load_for_inference, synthetic_tokens, vectors_from_tokens  # noqa: E402
from speechless.llm.instructions import speech_parts  # noqa: E402
from speechless.speech.rvq import SpeechRVQ  # noqa: E402
from speechless.speech.tokens import resolve_stage1  # noqa: E402
from stages.stage3_llm import Stage3Config, adapter_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a stage-3 run folder (resolved_config.yaml, metrics.json, work/)")
    parser.add_argument("--variants", default="synthetic_speech/lora,real_speech_topline/lora")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the run's stage-3 config (e.g. data.stage2=runs/x/stage2); repeatable")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(Stage3Config, args.run / "resolved_config.yaml", args.overrides)
    metrics = json.loads((args.run / "metrics.json").read_text())["eval"]
    eval_rows = [row for _, row in read_jsonl(args.run / "work" / "data" / "eval.jsonl")]
    began = time.time()
    tokens, record = synthetic_tokens(cfg.data.stage2, cfg.data.stage1, cfg.data.generate, cfg.data.synthetic_draws, eval_rows,
                                      args.run / "work" / "heldout_synthetic", cfg.store)
    rvq = SpeechRVQ.load(resolve_stage1(cfg.data.stage1, cfg.store).folder)
    print(f"stage-2 speech of {len(tokens)} held-out recordings ({time.time() - began:.0f} s); draws: {record.get('draws')}",
          file=sys.stderr)
    rows = []
    for variant in args.variants.split(","):
        model, adapter, _ = load_for_inference(str(adapter_folder(args.run, variant, metrics["main"])))
        levels = adapter.get("speech_levels")
        clips = {}
        for row in eval_rows:
            for part in speech_parts(row):
                key = part.get("utterance") or part["text"]
                clips[part.get("utterance") or part["audio"]] = [vectors_from_tokens(rvq, tokens[key], levels)]
        synthetic = evaluate(model, eval_rows, clips, cfg.eval)
        real = metrics["variants"][variant]["speech"]
        for task in synthetic:
            rows.append((variant, levels, task, real[task]["score"], synthetic[task]["score"]))
        print(f"{variant}: done ({time.time() - began:.0f} s)", file=sys.stderr)
    print(f"Held-out requests of {args.run} ({len(eval_rows)} conversations), as real speech vs as the speech of stage 2 "
          f"{record['revision'][:12]}{' with ' + ', '.join(args.overrides) if args.overrides else ''}:\n")
    print("| model | levels heard | task | real speech | stage-2 speech |\n|---|---|---|---|---|")
    for variant, levels, task, real, synthetic in rows:
        print(f"| {variant} | {levels or 'all'} | {task} | {real:.3f} | {synthetic:.3f} |")


if __name__ == "__main__":
    main()
