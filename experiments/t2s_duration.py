"""Question: does a non-autoregressive duration model (FastSpeech-style) say unseen sentences better than the
autoregressive stage 2, judged by the same judge on the same stage 1?

Units: the judge's characters. Durations: CTC forced alignment of the real train tokens by the judge. Model: character
encoder (transformer) -> duration predictor (log frames) -> length regulator -> frame decoder (transformer) -> per-level
code logits (head 'codes') or the decoded stage-1 vector (head 'vector', then stage-1's RVQ encodes it).

    python experiments/t2s_duration.py --run runs/demo --steps 300 --head codes
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from speechless.core.metrics import cer
from speechless.speech.rvq import SpeechRVQ
from speechless.speech.tokens import load_split, resolve_stage1, row_codes, speaker_map
from speechless.t2s.align import ctc_viterbi, probe_char_map, token_durations
from speechless.t2s.probe import _pad
from speechless.t2s.roundtrip import load_probe


class DurationT2S(torch.nn.Module):
    def __init__(self, vocab: int, speakers: int, levels: int, codebook: int, dim: int, head: str, rvq_dim: int,
                 text_layers: int = 2, frame_layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.head_kind = head
        self.levels, self.codebook = levels, codebook
        self.char = torch.nn.Embedding(vocab, dim)
        self.char_pos = torch.nn.Embedding(512, dim)
        self.frame_pos = torch.nn.Embedding(1024, dim)
        self.span_pos = torch.nn.Embedding(16, dim)
        self.speaker = torch.nn.Embedding(max(speakers, 1), dim)

        def stack(n):
            layer = torch.nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout, batch_first=True, norm_first=True, activation="gelu")
            return torch.nn.TransformerEncoder(layer, n, enable_nested_tensor=False)

        self.text_enc = stack(text_layers)
        self.frame_dec = stack(frame_layers)
        self.dur = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, 1))
        self.norm = torch.nn.LayerNorm(dim)
        if head == "codes":
            self.out = torch.nn.Sequential(torch.nn.Linear(dim, 128), torch.nn.Linear(128, levels * codebook))
        else:
            self.out = torch.nn.Linear(dim, rvq_dim)

    def encode_text(self, chars, char_mask, spk):
        x = self.char(chars) + self.char_pos(torch.arange(chars.shape[1])[None]) + self.speaker(spk)[:, None]
        return self.text_enc(x, src_key_padding_mask=~char_mask)

    def frames(self, h, durations, spk):
        """Length regulator: each char's state repeated over its frames, plus in-span and frame positions."""
        B = h.shape[0]
        totals = durations.sum(1)
        T = int(totals.max())
        out = h.new_zeros(B, T, h.shape[-1])
        span = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            idx = torch.repeat_interleave(torch.arange(h.shape[1]), durations[b])
            out[b, : len(idx)] = h[b, idx]
            starts = torch.repeat_interleave(torch.cumsum(durations[b], 0) - durations[b], durations[b])
            span[b, : len(idx)] = (torch.arange(len(idx)) - starts).clamp(max=15)
        mask = torch.arange(T)[None] < totals[:, None]
        x = out + self.span_pos(span) + self.frame_pos(torch.arange(T)[None].clamp(max=1023)) + self.speaker(spk)[:, None]
        y = self.norm(self.frame_dec(x, src_key_padding_mask=~mask))
        return self.out(y), mask


def batches(n, size, rng):
    order = list(range(n))
    while True:
        rng.shuffle(order)
        for i in range(0, n - size + 1, size):
            yield order[i:i + size]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--head", default="codes", choices=["codes", "vector"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    run = Path(args.run)
    stage1 = resolve_stage1(str(run / "stage1"))
    probe = load_probe(run / "stage2" / "probe", stage1)
    rvq = SpeechRVQ.load(run / "stage1")
    speakers = speaker_map(stage1)
    rows = {s: load_split(stage1, s) for s in ("train", "test")}
    names = sorted({speakers[r["id"]] for r in rows["train"]})
    alphabet = probe.alphabet
    index = {c: i + 1 for i, c in enumerate(alphabet)}

    def prep(split, align):
        items = []
        for r in rows[split]:
            form, _ = probe_char_map(r["text"])
            ids = [index[c] for c in form if c in index]
            codes = row_codes(r)
            dur = None
            if align:
                batch, lengths = _pad([codes], probe.num_levels)
                with torch.no_grad():
                    lp = probe(batch, lengths)[0, : codes.shape[1] * probe.cfg.upsample]
                path = ctc_viterbi(lp, ids)
                if path is None:
                    continue
                dur = token_durations([(i, i + 1) for i in range(len(form))], list(range(len(form))),
                                      [p // probe.cfg.upsample for p in path], codes.shape[1])
            items.append((ids, codes, names.index(speakers[r["id"]]), dur, r["text"]))
        return items

    probe.eval()
    t0 = time.time()
    train = prep("train", True)
    test = prep("test", False)
    print(f"aligned {len(train)} train utterances in {time.time() - t0:.0f} s; {len(test)} test", flush=True)
    Q, C = stage1.num_levels, stage1.codebook_size
    model = DurationT2S(len(alphabet) + 1, len(names), Q, C, args.dim, args.head, rvq.dim)
    print(f"parameters {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(0)
    gen = batches(len(train), args.batch, rng)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1, step / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1, step / args.steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = next(gen)
        L = max(len(train[i][0]) for i in idx)
        chars = torch.zeros(len(idx), L, dtype=torch.long)
        durs = torch.zeros(len(idx), L, dtype=torch.long)
        for b, i in enumerate(idx):
            chars[b, : len(train[i][0])] = torch.tensor(train[i][0])
            durs[b, : len(train[i][0])] = torch.tensor(train[i][3])
        spk = torch.tensor([train[i][2] for i in idx])
        cmask = chars > 0
        model.train()
        h = model.encode_text(chars, cmask, spk)
        logd = model.dur(h).squeeze(-1)
        dloss = ((logd - torch.log1p(durs.float())) ** 2)[cmask].mean()
        out, fmask = model.frames(h, durs, spk)
        T = out.shape[1]
        codes = torch.zeros(len(idx), T, Q, dtype=torch.long)
        for b, i in enumerate(idx):
            c = train[i][1].T
            codes[b, : c.shape[0]] = c
        if args.head == "codes":
            logits = out.view(len(idx), T, Q, C)
            closs = F.cross_entropy(logits[fmask].reshape(-1, C), codes[fmask].reshape(-1))
        else:
            target = rvq.decode(codes[fmask])
            closs = F.mse_loss(out[fmask], target) / target.var()
        loss = closs + dloss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step} loss {closs.item():.3f} dur {dloss.item():.3f} {time.time() - t0:.0f} s", flush=True)
    train_s = time.time() - t0
    model.eval()
    gen_codes = []
    t0 = time.time()
    with torch.no_grad():
        for start in range(0, len(test), 32):
            part = test[start:start + 32]
            L = max(len(p[0]) for p in part)
            chars = torch.zeros(len(part), L, dtype=torch.long)
            for b, p in enumerate(part):
                chars[b, : len(p[0])] = torch.tensor(p[0])
            spk = torch.tensor([p[2] for p in part])
            cmask = chars > 0
            h = model.encode_text(chars, cmask, spk)
            d = (torch.expm1(model.dur(h).squeeze(-1)).round().clamp(min=0).long()) * cmask
            d[d.sum(1) == 0, 0] = 1
            out, fmask = model.frames(h, d, spk)
            for b in range(len(part)):
                n = int(d[b].sum())
                if args.head == "codes":
                    lg = out[b, :n].view(n, Q, C)
                    if args.temperature > 0:
                        c = torch.distributions.Categorical(logits=lg / args.temperature).sample()
                    else:
                        c = lg.argmax(-1)
                else:
                    c = rvq.encode(out[b, :n])
                gen_codes.append(c.T.contiguous())
    gen_s = time.time() - t0
    real = [p[1] for p in test]
    texts = [p[4] for p in test]
    hyp_real = probe.transcribe(real)
    hyp_gen = probe.transcribe(gen_codes)
    rf = torch.tensor([c.shape[1] for c in real], dtype=torch.float64)
    gf = torch.tensor([c.shape[1] for c in gen_codes], dtype=torch.float64)
    res = {"head": args.head, "steps": args.steps, "train_seconds": round(train_s, 1), "gen_seconds": round(gen_s, 1),
           "probe_cer_real": round(cer(texts, hyp_real), 4), "probe_cer_generated": round(cer(texts, hyp_gen), 4),
           "duration_ratio": round(float((gf / rf).mean()), 3),
           "duration_corr": round(float(torch.corrcoef(torch.stack([rf, gf]))[0, 1]), 3),
           "examples": [(texts[i], hyp_gen[i]) for i in range(4)]}
    res["ratio"] = round(res["probe_cer_generated"] / res["probe_cer_real"], 2)
    print(json.dumps(res, indent=1, ensure_ascii=False))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
