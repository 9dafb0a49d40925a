"""Stage-2 audio steps: the delay pattern of the codebook levels, training batches, and the frame-level tables
(progress buckets, constant-rate and aligned text positions, whole-frame durations) both decoders read.

Frame modelling (`frame_mode`) is a *delay pattern*: level k of frame t is emitted at audio step t + d_k.

* `delay` (d_k = k, MusicGen): level k of a frame is predicted one step after level k-1 of the same frame, so it sees
  the coarser levels of its own frame through the previous inputs; a row of T frames takes T + Q steps.
* `parallel` (d_k = 0): all levels of a frame at once, independent given the past; T + 1 steps.
* `coarse_first` (d_0 = 0, d_k = 1): level 0 first, the Q - 1 finer levels together one step later; T + 2 steps.

Per level the input vocabulary is the codebook plus EOA (end of audio), PAD and BOA (begin of audio, also used for
"before this level's first frame"); the output vocabulary is the codebook plus EOA. The model learns when to stop:
level 0 emits EOA after the last frame (its target at step T); the other levels' ends follow from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speechless.core.errors import UsageError

DELAYS = {"delay": lambda q: list(range(q)), "parallel": lambda q: [0] * q, "coarse_first": lambda q: [0] + [1] * (q - 1)}


def delays_for(frame_mode: str, num_levels: int) -> list[int]:
    return DELAYS[frame_mode](num_levels)


def whole_frames(real: torch.Tensor) -> torch.Tensor:
    """Real-valued token durations (B, Lt) -> whole frames, rounded on the running sum, so that each row's total is
    its rounded sum (rounding token by token would add up its errors)."""
    ends = real.cumsum(-1).round().long()
    return torch.diff(ends, dim=-1, prepend=torch.zeros_like(ends[:, :1]))


def scale_durations(durations: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """Token durations (B, Lt) stretched to sum to `totals` (B,) each, in whole frames."""
    return whole_frames(durations.float() * (totals.float() / durations.sum(-1).clamp_min(1).float())[:, None])


def progress_buckets(steps: torch.Tensor, frames: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket of audio steps `steps` (B, S) in utterances of `frames` (B,) frames: floor(s x (K - 1) / T), so the last
    bucket K - 1 is reached exactly at step T (where level 0 says end-of-audio) and kept after it."""
    last = buckets - 1
    return torch.clamp(steps * last // frames.clamp_min(1)[:, None], max=last)


def constant_rate_index(text_mask: torch.Tensor, steps: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """For audio steps `steps` (B, S) of utterances of `frames` (B,) frames whose text fills the right end of
    `text_mask` (B, Lt) (left padding): the index into the text of the token a constant speaking rate puts at each
    step, floor(s x n / T) counted from the first real token and kept at the last one from step T on."""
    n = text_mask.sum(-1)
    start = text_mask.shape[1] - n
    rel = torch.minimum(steps * n[:, None] // frames.clamp_min(1)[:, None], (n - 1).clamp_min(0)[:, None])
    return start[:, None] + rel


# ------------------------------------------------------------------------------------------------------------ batch

@dataclass
class Batch:
    text_ids: torch.Tensor  # (B, Lt) left-padded
    text_mask: torch.Tensor  # (B, Lt)
    audio_in: torch.Tensor  # (B, S, Q) input tokens per step and level
    audio_mask: torch.Tensor  # (B, S)
    targets: torch.Tensor  # (B, S, Q) target per step and level; -100 = no loss
    speakers: torch.Tensor  # (B,)
    frames: torch.Tensor  # (B,) frames of each utterance
    durations: torch.Tensor | None = None  # (B, Lt) frames of each text token (aligned; 0 on padding), or None
    frame_tokens: torch.Tensor | None = None  # (B, S) index into text_ids of the token spoken at each audio step

    def to(self, device) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in (
            self.text_ids, self.text_mask, self.audio_in, self.audio_mask, self.targets, self.speakers, self.frames,
            self.durations, self.frame_tokens)))


def frame_token_index(durations: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, Lt) token durations of left-padded texts -> (B, steps): the index into the row of the token spoken at
    each frame (frames past the last token's end keep the last token)."""
    ends = durations.cumsum(-1)  # (B, Lt): a frame f belongs to the first token whose end is > f
    frames = torch.arange(steps, device=durations.device)
    index = torch.searchsorted(ends, frames.expand(durations.shape[0], -1).contiguous(), right=True)
    return index.clamp(max=durations.shape[1] - 1)


def delayed_tokens(codes: torch.Tensor, delays: list[int], codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (Q, T) -> (inputs (S, Q), targets (S, Q)) with S = T + max(delays) + 1 audio steps.

    Target of level k at step s is frame f = s - d_k: its code when 0 <= f < T, EOA when f == T, ignored (-100)
    otherwise. The input of step s is the target of step s - 1, with BOA before a level's first frame and PAD after EOA.
    """
    q, t = codes.shape
    eoa, pad, boa = codebook_size, codebook_size + 1, codebook_size + 2
    steps = t + max(delays) + 1
    targets = torch.full((steps, q), -100, dtype=torch.long)
    inputs = torch.full((steps, q), pad, dtype=torch.long)
    for level, d in enumerate(delays):
        targets[d:d + t, level] = codes[level]
        targets[d + t, level] = eoa
        inputs[: d + 1, level] = boa
        inputs[d + 1:d + t + 1, level] = codes[level]
        if d + t + 1 < steps:
            inputs[d + t + 1, level] = eoa
    return inputs, targets


def collate(items: list[tuple], delays: list[int], codebook_size: int) -> Batch:
    """(text_ids, codes (Q, T), speaker[, token durations]) items -> a Batch: text left-padded, audio steps
    right-padded; with durations (each list summing to T), the aligned token of every step too."""
    lt = max(len(item[0]) for item in items)
    pairs = [delayed_tokens(item[1], delays, codebook_size) for item in items]
    sa = max(inp.shape[0] for inp, _ in pairs)
    q = items[0][1].shape[0]
    b = len(items)
    text_ids = torch.zeros(b, lt, dtype=torch.long)
    text_mask = torch.zeros(b, lt, dtype=torch.long)
    audio_in = torch.full((b, sa, q), codebook_size + 1, dtype=torch.long)
    audio_mask = torch.zeros(b, sa, dtype=torch.long)
    targets = torch.full((b, sa, q), -100, dtype=torch.long)
    aligned = len(items[0]) > 3 and items[0][3] is not None
    durations = torch.zeros(b, lt, dtype=torch.long) if aligned else None
    for row, (item, (inp, tgt)) in enumerate(zip(items, pairs)):
        ids = item[0]
        text_ids[row, lt - len(ids):] = torch.tensor(ids, dtype=torch.long)
        text_mask[row, lt - len(ids):] = 1
        audio_in[row, : inp.shape[0]] = inp
        audio_mask[row, : inp.shape[0]] = 1
        targets[row, : tgt.shape[0]] = tgt
        if aligned:
            if len(item[3]) != len(ids) or sum(item[3]) != item[1].shape[1]:
                raise UsageError(f"collate: {len(item[3])} durations summing to {sum(item[3])} for {len(ids)} tokens and "
                                 f"{item[1].shape[1]} frames; durations must give every token its frames")
            durations[row, lt - len(ids):] = torch.tensor(item[3], dtype=torch.long)
    speakers = torch.tensor([item[2] for item in items], dtype=torch.long)
    frames = torch.tensor([item[1].shape[1] for item in items], dtype=torch.long)
    frame_tokens = frame_token_index(durations, sa) if aligned else None
    return Batch(text_ids, text_mask, audio_in, audio_mask, targets, speakers, frames, durations, frame_tokens)

