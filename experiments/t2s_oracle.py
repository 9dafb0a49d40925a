"""Where a parallel stage 2's round-trip errors come from: durations or frame content, coarse or fine levels.

Question: the parallel decoder's speech of unseen sentences reads back at a judge CER several times the real tokens'
(the demo: 0.040 vs 0.006). Is that the duration predictor (how many frames each token gets) or the frames themselves,
and at which stage-1 levels? Everything is measured with the run's own judge on its round-trip split:

- predicted durations (what the round trip does);
- oracle durations: each token gets the frames the judge's CTC alignment gives it in the REAL recording of the same
  utterance (then generated and real have equal length, frame for frame);
- with oracle durations, mixed codes: the generated level 0 with the real levels 1-7, and the real level 0 with the
  generated levels 1-7;
- per frame: level-0 agreement and the squared error of the generated vector to the real one (standardised units).

    python experiments/t2s_oracle.py --stage2 runs/demo/stage2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechless.core.metrics import cer  # noqa: E402
from speechless.speech.tokens import load_split, resolve_stage1, row_codes, speaker_map  # noqa: E402
from speechless.t2s.generate import load_stage2  # noqa: E402
from speechless.t2s.roundtrip import load_probe  # noqa: E402
from stages.stage2_t2s import align_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage2", required=True, help="a stage-2 run folder (parallel decoder) with its probe/")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    model, _, folder = load_stage2(args.stage2)
    if model.cfg.decoder != "parallel":
        raise SystemExit(f"{args.stage2}: decoder {model.cfg.decoder!r}; this diagnostic is for the parallel decoder")
    stage1 = resolve_stage1(model.stage1.get("version") or model.stage1["ref"])
    probe = load_probe(folder / "probe", stage1)
    rows = load_split(stage1, args.split)
    speakers = speaker_map(stage1)
    texts = [r["text"] for r in rows]
    real = [row_codes(r) for r in rows]  # (Q, T)
    ids = [[i for chunk in model.text.encode(t).chunks for i in chunk][: model.cfg.max_text_tokens] for t in texts]
    spk = [model.speakers.index(speakers[r["id"]]) if model.speaker_embed is not None and speakers.get(r["id"]) in model.speakers else 0
           for r in rows]
    oracle = align_text(model, probe, rows, args.split)
    if any(len(d) != len(i) for d, i in zip(oracle, ids)):
        raise SystemExit("alignment and text tokens differ in length")

    def generate(durations: list[list[int]] | None) -> list[torch.Tensor]:
        original, out = model.predict_durations, []
        try:
            for start in range(0, len(ids), 32):
                chunk = slice(start, start + 32)
                if durations is not None:
                    def fixed(tids, _tmask, _spk, rows_d=durations[chunk]):  # left-padded like the texts
                        table = torch.zeros_like(tids)
                        for row, d in enumerate(rows_d):
                            table[row, tids.shape[1] - len(d):] = torch.tensor(d)
                        return table
                    model.predict_durations = fixed
                codes, _ = model.generate(ids[chunk], spk[chunk], max_frames=10_000)
                out.extend(codes)
            return out
        finally:
            model.predict_durations = original

    predicted = generate(None)
    forced = generate(oracle)
    assert all(f.shape == r.shape for f, r in zip(forced, real)), "oracle durations give the real length"

    def read(codes: list[torch.Tensor]) -> float:
        return round(cer(texts, probe.transcribe(codes)), 4)

    def mixed(level0_from: list[torch.Tensor], rest_from: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat([a[:1], b[1:]]) for a, b in zip(level0_from, rest_from)]

    flat_f = torch.cat([f.T for f in forced])
    flat_r = torch.cat([r.T for r in real])
    vec_f, vec_r = model.decode_codes(flat_f).float(), model.decode_codes(flat_r).float()
    result = {
        "stage2": str(folder), "split": args.split, "utterances": len(rows),
        "cer_real": read(real),
        "cer_generated_predicted_durations": read(predicted),
        "cer_generated_oracle_durations": read(forced),
        "cer_generated_level0_real_rest": read(mixed(forced, real)),
        "cer_real_level0_generated_rest": read(mixed(real, forced)),
        "level0_agreement_oracle": round(float((flat_f[:, 0] == flat_r[:, 0]).float().mean()), 4),
        "level_agreement_oracle": [round(float((flat_f[:, q] == flat_r[:, q]).float().mean()), 4) for q in range(flat_f.shape[1])],
        "vector_mse_oracle": round(float(((vec_f - vec_r) ** 2).mean()), 4),
        "real_vector_variance": round(float(vec_r.var(0).mean()), 4),
        "token_duration_mae_frames": duration_error(model, ids, spk, oracle),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


@torch.no_grad()
def duration_error(model, ids: list[list[int]], spk: list[int], oracle: list[list[int]]) -> float:
    """Mean |predicted - aligned| frames per text token."""
    total = count = 0
    for row, d in enumerate(oracle):
        tids = torch.tensor([ids[row]], device=model.device)
        got = model.predict_durations(tids, torch.ones_like(tids), torch.tensor([spk[row]], device=model.device))[0].tolist()
        total += sum(abs(a - b) for a, b in zip(got, d))
        count += len(d)
    return round(total / max(count, 1), 3)


if __name__ == "__main__":
    main()
