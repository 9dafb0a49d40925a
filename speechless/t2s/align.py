"""Text-to-frame alignment of real utterances: per text token, how many 40 ms frames its speech took.

Stage 2 learns these durations (`model.alignment: ctc`) so that every generated frame reads the text token spoken
there, the way duration-based text-to-speech models learn from little data. The alignment comes for free from a CTC
model over characters that reads stage-1 tokens (the stage-2 judge, trained on real tokens of the train split): CTC
forced alignment (Viterbi over the blank-interleaved transcript) gives each character the output slot where it is
emitted; a token starts at the frame of its first character and lasts until the next token starts (the first token
also takes the leading silence, the last the trailing one).
"""

from __future__ import annotations

import unicodedata

import torch


def ctc_viterbi(log_probs: torch.Tensor, targets: list[int], blank: int = 0) -> list[int] | None:
    """The most likely CTC path of `targets` through `log_probs` (S, V): the slot where each target is first emitted
    (non-decreasing; strictly increasing for repeated symbols). None when S slots cannot hold the transcript."""
    n = len(targets)
    if n == 0:
        return []
    states = torch.full((2 * n + 1,), blank, dtype=torch.long)
    states[1::2] = torch.tensor(targets, dtype=torch.long)
    repeats = sum(1 for a, b in zip(targets, targets[1:]) if a == b)
    if log_probs.shape[0] < n + repeats:
        return None
    emit = log_probs[:, states].double()  # (S, 2n + 1)
    skip_ok = torch.zeros(2 * n + 1, dtype=torch.bool)  # s - 2 -> s allowed: a symbol differing from the one before
    skip_ok[3::2] = states[3::2] != states[1:-2:2]
    neg = torch.tensor(-float("inf"), dtype=torch.float64)
    score = torch.full((2 * n + 1,), -float("inf"), dtype=torch.float64)
    score[0], score[1] = emit[0, 0], emit[0, 1]
    back = torch.zeros(log_probs.shape[0], 2 * n + 1, dtype=torch.uint8)  # 0 stay, 1 from s-1, 2 from s-2
    for t in range(1, log_probs.shape[0]):
        one = torch.cat([neg.view(1), score[:-1]])
        two = torch.where(skip_ok, torch.cat([neg.view(1).expand(2), score[:-2]]), neg)
        stacked = torch.stack([score, one, two])
        best, back[t] = stacked.max(0)
        score = best + emit[t]
    end = 2 * n if score[2 * n] >= score[2 * n - 1] else 2 * n - 1
    if not torch.isfinite(score[end]):
        return None
    first = [0] * n
    s = end
    for t in range(log_probs.shape[0] - 1, -1, -1):
        if s % 2 == 1:
            first[s // 2] = t
        s -= int(back[t, s])
    return first


def probe_char_map(text: str) -> tuple[str, list[int | None]]:
    """The judge's form of `text` (lower case, punctuation/symbols as spaces, spaces collapsed and stripped; see
    `speechless.core.metrics.probe_text`) and, for every character of `text`, the index of its character there (None = dropped)."""
    chars: list[str] = []
    index: list[int | None] = []
    for ch in text:
        low = ch.lower()
        if unicodedata.category(low[0])[0] in "PSZC":
            low = " "
        if low == " " and (not chars or chars[-1] == " "):
            index.append(None)
            continue
        index.append(len(chars))
        chars.extend(low)
    while chars and chars[-1] == " ":
        chars.pop()
    index = [i if i is not None and i < len(chars) else None for i in index]
    return "".join(chars), index


def token_durations(offsets: list[tuple[int, int]], char_map: list[int | None], char_frames: list[int], frames: int) -> list[int]:
    """Frames of each token: token k (characters `offsets[k]` of the text) starts at the frame of its first aligned
    character and lasts until the next token starts; a token with no aligned character lasts 0 frames. The first token
    starts at frame 0 and the last ends at `frames`, so the durations sum to `frames`."""
    starts: list[int | None] = []
    for lo, hi in offsets:
        aligned = [char_map[i] for i in range(lo, min(hi, len(char_map))) if char_map[i] is not None]
        starts.append(min(char_frames[i] for i in aligned) if aligned else None)
    following = frames
    for k in range(len(starts) - 1, -1, -1):  # unaligned tokens start where the next one does
        if starts[k] is None:
            starts[k] = following
        following = starts[k] = min(starts[k], following)
    if starts:
        starts[0] = 0
    bounds = [min(max(s, 0), frames) for s in starts] + [frames]
    return [bounds[k + 1] - bounds[k] for k in range(len(starts))]


def proportional_durations(tokens: int, frames: int) -> list[int]:
    """A constant speaking rate: `frames` shared evenly over `tokens` tokens (the fallback when alignment fails)."""
    bounds = [k * frames // tokens for k in range(tokens + 1)]
    return [bounds[k + 1] - bounds[k] for k in range(tokens)]


@torch.no_grad()
def align_durations(probe, items: list[tuple[str, list[tuple[int, int]], torch.Tensor]], batch_size: int = 32) -> tuple[list[list[int]], int]:
    """Token durations of real utterances given as (text the offsets refer to, token offsets, codes (Q, T)), read by
    the CTC `probe` (a `speechless.t2s.probe.CTCProbe`). Returns the durations (each sums to T) and how many utterances
    fell back to proportional durations (transcript not alignable)."""
    from speechless.t2s.probe import _pad

    probe.eval()
    out: list[list[int]] = [[] for _ in items]
    failed = 0
    up = probe.cfg.upsample
    order = sorted(range(len(items)), key=lambda i: items[i][2].shape[-1])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch, lengths = _pad([items[i][2] for i in idx], probe.num_levels)
        log_probs = probe(batch, lengths)
        for row, i in enumerate(idx):
            text, offsets, codes = items[i]
            frames = codes.shape[-1]
            form, char_map = probe_char_map(text)
            targets = [probe.char_index.get(ch) for ch in form]
            path = None
            if form and None not in targets:
                path = ctc_viterbi(log_probs[row, : frames * up], targets)
            if path is None:
                failed += 1
                out[i] = proportional_durations(len(offsets), frames)
                continue
            out[i] = token_durations(offsets, char_map, [slot // up for slot in path], frames)
    return out, failed
