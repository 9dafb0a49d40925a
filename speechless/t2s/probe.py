"""The judge of stage 2: a small CTC ASR probe reading stage-1 semantic tokens and writing characters.

Nothing in the project turns tokens back into text, so the round trip text -> stage-2 tokens -> text needs this probe.
It is trained on REAL pairs (stage-1 tokens of recorded/synthesised speech -> transcript) and then reads both real
held-out tokens and stage-2 tokens generated from the same sentences' text: if stage 2 is faithful, the two CERs match.

Model: the frame's Q codes in -> `input: codes`: the sum of one learned embedding per level; `input: vectors`: the
stage-1 decoded vector (the sum of the frozen stage-1 codewords, standardised units, what stage 3 consumes) through a
learned linear map -> residual 1-D convolutions
(-> optionally a bidirectional GRU) -> per frame `upsample` output slots of characters + blank (25 frames/s is close to the
character rate of speech, so each frame may emit up to `upsample` characters) -> CTC. Greedy decoding.

Text is compared after `probe_text`: NFC, lower case, punctuation and symbols removed, whitespace collapsed (speech
carries no punctuation). CER is jiwer's (total character edits / total reference characters).
"""

from __future__ import annotations

import math
import random
import re
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from speechless.core.config import Section
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import load_tensors, read_json, save_tensors, write_json
from speechless.core.metrics import probe_text
from speechless.core.training import bucketed_batches, lr_factor

FORMAT = "speechless-ctc-probe"
FORMAT_VERSION = 1
#: One metadata key only: safetensors writes metadata in hash-map order, so two keys would make identical weights
#: give different bytes from run to run.
WEIGHTS_METADATA = {"format": f"{FORMAT}/{FORMAT_VERSION}"}


class ProbeConfig(Section):
    """The CTC ASR probe that judges the round trip."""

    input: Literal["codes", "vectors"] = "codes"
    """What the probe reads: 'codes' = a learned embedding per (level, code), summed; 'vectors' = the decoded stage-1
    vectors (frozen codebooks, not saved with the probe: loading needs the stage-1 version it was trained on)."""
    dim: int = Field(192, ge=8)
    """Width of the code embeddings, convolutions and GRU (both directions together)."""
    conv_layers: int = Field(4, ge=0)
    """Residual 1-D convolution blocks."""
    kernel: int = Field(5, ge=1)
    """Convolution kernel width in frames (odd)."""
    rnn: bool = False
    """Add a bidirectional GRU after the convolutions (more context; sequential in time, so slow on CPUs)."""
    upsample: int = Field(2, ge=1)
    """Output slots per 40 ms frame (CTC needs at least one slot per character plus blanks between repeats)."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout after the embeddings and inside the blocks."""
    steps: int = Field(700, ge=0)
    """Training steps."""
    batch_size: int = Field(32, ge=1)
    """Utterances per step."""
    learning_rate: float = Field(3e-3, gt=0.0)
    """Peak AdamW learning rate (linear warmup over 5% of the steps, then cosine decay to `min_lr_ratio` x peak)."""
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)
    """Final learning rate as a share of the peak (0-1)."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay."""
    seed: int = 0
    """Seed for initialisation and batch order."""


class CTCProbe(torch.nn.Module):
    def __init__(self, cfg: ProbeConfig, num_levels: int, codebook_size: int, alphabet: str, codebooks: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.alphabet = alphabet
        self.char_index = {ch: i + 1 for i, ch in enumerate(alphabet)}  # 0 = CTC blank
        d = cfg.dim
        if cfg.input == "vectors":
            if codebooks is None or tuple(codebooks.shape[:2]) != (num_levels, codebook_size):
                raise UsageError(f"probe input 'vectors' needs the stage-1 codebooks ({num_levels} x {codebook_size} x D), "
                                 f"got {None if codebooks is None else tuple(codebooks.shape)}")
            self.register_buffer("books", codebooks.detach().float().reshape(num_levels * codebook_size, -1).clone(), persistent=False)
            self.embed = torch.nn.Linear(self.books.shape[1], d)
        else:
            self.embed = torch.nn.Embedding(num_levels * codebook_size, d)
            torch.nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(num_levels))
        self.register_buffer("offsets", torch.arange(num_levels) * codebook_size, persistent=False)
        self.convs = torch.nn.ModuleList(torch.nn.Conv1d(d, d, cfg.kernel, padding=cfg.kernel // 2) for _ in range(cfg.conv_layers))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(cfg.conv_layers))
        self.rnn = torch.nn.GRU(d, d // 2, batch_first=True, bidirectional=True) if cfg.rnn else None
        self.out = torch.nn.Linear(2 * (d // 2) if cfg.rnn else d, cfg.upsample * (len(alphabet) + 1))
        self.drop = torch.nn.Dropout(cfg.dropout)

    @property
    def vocab(self) -> int:
        return len(self.alphabet) + 1

    def forward(self, codes: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """codes (B, T, Q), lengths (B,) -> log-probs (B, T * upsample, vocab)."""
        if self.cfg.input == "vectors":
            x = self.drop(self.embed(self.books[codes + self.offsets].sum(-2)))
        else:
            x = self.drop(self.embed(codes + self.offsets).sum(-2))
        mask = (torch.arange(codes.shape[1], device=codes.device)[None] < lengths[:, None]).unsqueeze(-1)
        for conv, norm in zip(self.convs, self.norms):
            x = norm(x + self.drop(F.gelu(conv((x * mask).transpose(1, 2)).transpose(1, 2))))
        y = x
        if self.rnn is not None:
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            y, _ = self.rnn(packed)
            y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=codes.shape[1])
        logits = self.out(self.drop(y)).view(codes.shape[0], codes.shape[1] * self.cfg.upsample, self.vocab)
        return logits.log_softmax(-1)

    def encode_text(self, text: str) -> list[int]:
        return [self.char_index[ch] for ch in probe_text(text) if ch in self.char_index]

    @torch.no_grad()
    def transcribe(self, codes: list[torch.Tensor], batch_size: int = 64) -> list[str]:
        """Greedy CTC transcripts of utterances given as (Q, T) code tensors (empty utterances -> '')."""
        self.eval()
        out = [""] * len(codes)
        order = sorted(range(len(codes)), key=lambda i: codes[i].shape[-1])
        for start in range(0, len(order), batch_size):
            idx = [i for i in order[start:start + batch_size] if codes[i].shape[-1] > 0]
            if not idx:
                continue
            batch, lengths = _pad([codes[i] for i in idx], self.num_levels)
            best = self(batch, lengths).argmax(-1)
            for row, i in enumerate(idx):
                seq = best[row, : int(lengths[row]) * self.cfg.upsample].tolist()
                chars, prev = [], 0
                for sym in seq:
                    if sym != prev and sym != 0:
                        chars.append(self.alphabet[sym - 1])
                    prev = sym
                out[i] = re.sub(r"\s+", " ", "".join(chars)).strip()
        return out

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        save_tensors(folder / "model.safetensors", dict(self.state_dict()), metadata=WEIGHTS_METADATA)
        write_json(folder / "config.json", dict(format=FORMAT, version=FORMAT_VERSION, probe=self.cfg.model_dump(mode="json"),
                                                num_levels=self.num_levels, codebook_size=self.codebook_size,
                                                alphabet=self.alphabet, **(extra or {})))

    @classmethod
    def load(cls, folder: str | Path, codebooks: torch.Tensor | None = None) -> CTCProbe:
        """A saved probe; one with input 'vectors' needs the (Q, K, D) stage-1 codebooks it was trained with."""
        folder = Path(folder)
        meta = read_json(folder / "config.json")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise UsageError(f"{folder / 'config.json'}: not a speechless CTC probe (format {FORMAT} v{FORMAT_VERSION})")
        model = cls(ProbeConfig.model_validate(meta["probe"]), int(meta["num_levels"]), int(meta["codebook_size"]), meta["alphabet"],
                    codebooks)
        tensors = load_tensors(folder / "model.safetensors")
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise RuntimeFailure(f"{folder / 'model.safetensors'}: does not match the probe config ({str(exc).splitlines()[0]})") from exc
        return model.eval()


def _pad(codes: list[torch.Tensor], num_levels: int, multiple: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, T_i) tensors -> (B, T, Q) zero-padded to a multiple of `multiple` frames (few distinct shapes: oneDNN
    convolutions are compiled per input shape, which made variable-length batches 4x slower), lengths (B,)."""
    lengths = torch.tensor([c.shape[-1] for c in codes], dtype=torch.long)
    frames = -(-int(lengths.max()) // multiple) * multiple
    batch = torch.zeros(len(codes), frames, num_levels, dtype=torch.long)
    for row, c in enumerate(codes):
        batch[row, : c.shape[-1]] = c.T
    return batch, lengths


def train_probe(codes: list[torch.Tensor], texts: list[str], cfg: ProbeConfig, num_levels: int, codebook_size: int,
                log_every: int = 0, log=None, codebooks: torch.Tensor | None = None) -> tuple[CTCProbe, dict]:
    """Train a probe on real (codes (Q, T), transcript) pairs; returns (probe, summary with loss history and speed).
    `codebooks` (Q, K, D): the stage-1 codebooks, needed for `cfg.input == 'vectors'`."""
    if len(codes) != len(texts) or not codes:
        raise UsageError(f"train_probe: need matching, non-empty codes and transcripts (got {len(codes)} and {len(texts)})")
    alphabet = "".join(sorted({ch for t in texts for ch in probe_text(t)}))
    if not alphabet:
        raise UsageError("train_probe: the transcripts hold no characters after normalisation")
    torch.manual_seed(cfg.seed)
    probe = CTCProbe(cfg, num_levels, codebook_size, alphabet, codebooks)
    targets = [probe.encode_text(t) for t in texts]
    usable = [i for i, (c, t) in enumerate(zip(codes, targets)) if t and c.shape[-1] * cfg.upsample >= len(t)]
    if not usable:
        raise UsageError("train_probe: no utterance has a transcript that fits its frames")
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg.steps, warmup, cfg.min_lr_ratio))
    rng = random.Random(cfg.seed)
    queue: list[list[int]] = []
    history, started = [], time.time()
    probe.train()
    for step in range(cfg.steps):
        if not queue:
            queue = bucketed_batches([codes[i].shape[-1] for i in usable], cfg.batch_size, rng)
        batch_idx = [usable[i] for i in queue.pop()]
        batch, lengths = _pad([codes[i] for i in batch_idx], num_levels)
        tgt = [targets[i] for i in batch_idx]
        logp = probe(batch, lengths)
        loss = F.ctc_loss(logp.transpose(0, 1), torch.tensor([c for t in tgt for c in t]), lengths * cfg.upsample,
                          torch.tensor([len(t) for t in tgt]), blank=0, zero_infinity=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        history.append(float(loss.detach()))
        if log is not None and log_every and (step + 1) % log_every == 0:
            log(f"probe step {step + 1}/{cfg.steps}: ctc loss {sum(history[-log_every:]) / log_every:.3f}")
    probe.eval()
    seconds = time.time() - started
    return probe, {"steps": cfg.steps, "utterances": len(usable), "alphabet": alphabet, "seconds": round(seconds, 2),
                   "final_loss": round(sum(history[-20:]) / max(1, len(history[-20:])), 4) if history else None,
                   "parameters": sum(p.numel() for p in probe.parameters()), "layers": cfg.conv_layers}
