"""Where is a stage-2 model's round-trip error? Probe CER of generated tokens with some levels swapped for the real ones.

Each held-out text is generated at its REAL length (`target_frames`; needs a model with `progress_buckets`), so frame t
of the generated and the real tokens stand for about the same moment and levels can be mixed frame by frame. Also
measured: minimum-Bayes-risk decoding of level 0 (the code nearest the expected level-0 codeword under the model's
distribution, instead of a sampled code); and where in the sentence the probe loses the text: the share of reference
characters it reads back (aligned as equal by jiwer) in the first, middle and last third of each sentence.

    python benchmarks/t2s_level_diagnostic.py --model runs/demo/stage2 --stage1 runs/demo/stage1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from speechless.core.metrics import cer, probe_text  # noqa: E402
from speechless.speech.tokens import load_split, resolve_stage1, row_codes, speaker_map, stage1_codebooks  # noqa: E402
from speechless.t2s.model import T2SModel  # noqa: E402
from speechless.t2s.probe import CTCProbe  # noqa: E402
from stages.stage2_t2s import _items  # noqa: E402


def mbr_level0(model: T2SModel, codebook: torch.Tensor):
    """A `_pick` for `model` whose level-0 code is the codeword nearest the expected codeword (EOA when likelier than not)."""
    sample = model._pick

    def pick(logits, temperature, top_k, generator):
        tokens = sample(logits, temperature, top_k, generator)
        probs = logits[:, 0].softmax(-1)
        expected = probs[:, : codebook.shape[0]] @ codebook / probs[:, : codebook.shape[0]].sum(-1, keepdim=True)
        code = torch.cdist(expected, codebook).argmin(-1)
        tokens[:, 0] = torch.where(probs[:, -1] > 0.5, torch.full_like(code, model.eoa), code)
        return tokens

    return pick


def recall_by_third(references: list[str], hypotheses: list[str]) -> list[float]:
    """Share of reference characters read back (jiwer alignment 'equal') in each third of the reference."""
    import jiwer

    hits, totals = [0, 0, 0], [0, 0, 0]
    for ref, hyp in zip(references, hypotheses):
        ref, hyp = probe_text(ref), probe_text(hyp)
        if not ref:
            continue
        hit = [False] * len(ref)
        for chunk in jiwer.process_characters(ref, hyp or " ").alignments[0]:
            if chunk.type == "equal":
                hit[chunk.ref_start_idx:chunk.ref_end_idx] = [True] * (chunk.ref_end_idx - chunk.ref_start_idx)
        for i, h in enumerate(hit):
            third = min(3 * i // len(ref), 2)
            totals[third] += 1
            hits[third] += h
    return [round(h / max(t, 1), 4) for h, t in zip(hits, totals)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="stage-2 run folder (with probe/)")
    parser.add_argument("--stage1", required=True, help="the stage-1 run folder it was trained on")
    parser.add_argument("--split", default="test")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight (1 = off)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    stage1 = resolve_stage1(args.stage1)
    model = T2SModel.load(args.model)
    if model.progress_embed is None:
        sys.exit("this diagnostic generates at the real length: it needs a model trained with model.progress_buckets > 0")
    codebooks = stage1_codebooks(stage1)
    probe = CTCProbe.load(Path(args.model) / "probe", codebooks)
    rows = load_split(stage1, args.split)
    items = _items(rows, model, speaker_map(stage1))
    texts = [r["text"] for r in rows]
    real = [row_codes(r) for r in rows]

    def generate() -> list[torch.Tensor]:
        generator, out = torch.Generator().manual_seed(0), []
        for start in range(0, len(items), 64):
            chunk = items[start:start + 64]
            codes, _ = model.generate([i[0] for i in chunk], [i[2] for i in chunk], max_frames=750, temperature=args.temperature,
                                      top_k=args.top_k, generator=generator, target_frames=[i[1].shape[1] for i in chunk],
                                      guidance=args.guidance)
            out += codes
        return out

    def score(codes: list[torch.Tensor]) -> float:
        return round(cer(texts, probe.transcribe(codes)), 4)

    def mixed(base: list[torch.Tensor], other: list[torch.Tensor], levels: int) -> list[torch.Tensor]:
        """`base` with its first `levels` levels taken from `other` (both cut to the shorter length)."""
        out = []
        for b, o in zip(base, other):
            t = min(b.shape[1], o.shape[1])
            m = b[:, :t].clone()
            m[:levels] = o[:levels, :t]
            out.append(m)
        return out

    generated = generate()
    heard = {"real": probe.transcribe(real), "generated at the real length": probe.transcribe(generated)}
    print("| tokens | characters read back: first third | middle third | last third |")
    print("|---|---|---|---|")
    for name, transcripts in heard.items():
        print(f"| {name} | " + " | ".join(str(v) for v in recall_by_third(texts, transcripts)) + " |")
    print()
    lines = [(f"{name} tokens" if name == "real" else name, round(cer(texts, transcripts), 4)) for name, transcripts in heard.items()]
    for k in (1, 2, 4):
        levels = "level 0" if k == 1 else f"levels 0-{k - 1}"
        lines.append((f"generated {levels}, real finer levels", score(mixed(real, generated, k))))
        lines.append((f"real {levels}, generated finer levels", score(mixed(generated, real, k))))
    model._pick = mbr_level0(model, codebooks[0].float())
    lines.append(("generated, level 0 by minimum Bayes risk", score(generate())))
    print(f"| tokens ({len(rows)} utterances of split '{args.split}', T {args.temperature}, top-k {args.top_k}) | probe CER |")
    print("|---|---|")
    for name, value in lines:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
