"""Which duration predictor lets a trained parallel stage 2 say unseen sentences as well as real durations do?

With the judge's durations of the real recordings (oracle) a well-trained parallel stage 2 reads back at the real
tokens' CER; with its own predicted durations at about twice that (experiments/t2s_oracle.py). This trains duration
predictors apart from the model, on the training split's CTC alignment (the recipe's), and swaps each into the trained
stage 2 (its frame decoder unchanged) to measure the round trip on the test split with the run's judge:

- `conv3`: the product's `DurationPredictor` (two kernel-3 convolutions over the text embeddings), retrained here;
- `conv5x3`: three kernel-5 convolutions (a receptive field of 13 tokens instead of 5);
- `context`: the product's predictor over the backbone's hidden states of the text (all the text to the left, through
  the causal backbone) added to the embeddings.

    python experiments/t2s_duration_predictor.py --stage2 runs/demo/stage2 --steps 1500
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechless.core.metrics import cer  # noqa: E402
from speechless.speech.tokens import load_split, resolve_stage1, row_codes, speaker_map  # noqa: E402
from speechless.t2s.duration import DurationPredictor, frames_from_log  # noqa: E402
from speechless.t2s.generate import load_stage2  # noqa: E402
from speechless.t2s.roundtrip import load_probe  # noqa: E402
from stages.stage2_t2s import align_text  # noqa: E402


class WideConv(torch.nn.Module):
    def __init__(self, hidden: int, speakers: int, width: int = 256, kernel: int = 5, layers: int = 3, dropout: float = 0.2):
        super().__init__()
        self.inp = torch.nn.Linear(hidden, width)
        self.speaker = torch.nn.Embedding(max(speakers, 1), width)
        self.convs = torch.nn.ModuleList(torch.nn.Conv1d(width, width, kernel, padding=kernel // 2) for _ in range(layers))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(layers))
        self.out = torch.nn.Linear(width, 1)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, text_embeds, text_mask, speakers):
        keep = text_mask[..., None].to(text_embeds.dtype)
        x = (self.inp(text_embeds) + self.speaker(speakers)[:, None]) * keep
        for conv, norm in zip(self.convs, self.norms):
            x = self.drop(norm(F.relu(conv(x.transpose(1, 2)).transpose(1, 2)))) * keep
        return self.out(x)[..., 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage2", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--variants", default="conv3,conv5x3,context")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _, folder = load_stage2(args.stage2)
    model.eval()
    stage1 = resolve_stage1(model.stage1.get("version") or model.stage1["ref"])
    probe = load_probe(folder / "probe", stage1)
    speakers = speaker_map(stage1)

    def prepared(split: str):
        rows = load_split(stage1, split)
        durations = align_text(model, probe, rows, split)
        ids = [[i for c in model.text.encode(r["text"]).chunks for i in c][: model.cfg.max_text_tokens] for r in rows]
        spk = [model.speakers.index(speakers[r["id"]]) for r in rows]
        return rows, ids, spk, durations

    train, test = prepared("train"), prepared("test")

    def padded(ids: list[list[int]], spk: list[int]):
        lt = max(len(i) for i in ids)
        tids = torch.zeros(len(ids), lt, dtype=torch.long)
        tmask = torch.zeros(len(ids), lt, dtype=torch.long)
        for row, i in enumerate(ids):
            tids[row, lt - len(i):] = torch.tensor(i)
            tmask[row, lt - len(i):] = 1
        return tids, tmask, torch.tensor(spk)

    @torch.no_grad()
    def features(kind: str, tids, tmask):
        embeds = model._text_embeds(tids)
        if kind != "context":
            return embeds
        hidden = model._run(embeds, tmask, model._text_positions(tmask))[0]
        return embeds + hidden

    def fit(kind: str) -> torch.nn.Module:
        net = WideConv(model.hidden, len(model.speakers)) if kind == "conv5x3" else DurationPredictor(model.hidden, len(model.speakers), 0.2)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps, pct_start=0.05)
        rng = random.Random(0)
        _, ids, spk, dur = train
        net.train()
        for _ in range(args.steps):
            pick = rng.sample(range(len(ids)), 32)
            tids, tmask, s = padded([ids[i] for i in pick], [spk[i] for i in pick])
            target = torch.zeros_like(tids, dtype=torch.float)
            for row, i in enumerate(pick):
                target[row, tids.shape[1] - len(dur[i]):] = torch.tensor(dur[i], dtype=torch.float)
            predicted = net(features(kind, tids, tmask), tmask, s)
            real = tmask.bool()
            loss = F.mse_loss(predicted[real], torch.log1p(target[real]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        return net

    rows, ids, spk, oracle = test
    texts = [r["text"] for r in rows]

    def round_trip(predictor) -> tuple[float, float]:
        original = model.predict_durations
        if predictor is not None:
            def predict(tids, tmask, s, kind=predictor[0], net=predictor[1]):
                with torch.no_grad():
                    return frames_from_log(net(features(kind, tids, tmask), tmask, s), tmask)
            model.predict_durations = predict
        try:
            codes, per_token = [], []
            for start in range(0, len(ids), 32):
                chunk = slice(start, start + 32)
                codes.extend(model.generate(ids[chunk], spk[chunk], max_frames=10_000)[0])
                tids, tmask, s = padded(ids[chunk], spk[chunk])
                with torch.no_grad():
                    table = model.predict_durations(tids, tmask, s)
                for row, d in enumerate(oracle[chunk]):
                    per_token.extend(abs(int(a) - b) for a, b in zip(table[row, tids.shape[1] - len(d):].tolist(), d))
        finally:
            model.predict_durations = original
        return round(cer(texts, probe.transcribe(codes)), 4), round(sum(per_token) / len(per_token), 3)

    result = {"stage2": str(folder), "steps": args.steps, "cer_real": round(cer(texts, probe.transcribe([row_codes(r) for r in rows])), 4)}
    result["in_model"] = dict(zip(("cer", "token_mae_frames"), round_trip(None)))
    for kind in args.variants.split(","):
        result[kind] = dict(zip(("cer", "token_mae_frames"), round_trip((kind, fit(kind)))))
        print(kind, result[kind], flush=True)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
