"""The autoregressive stage-2 decoder (`model.decoder: autoregressive`): frame by frame, codes in, codes out.

An audio step's input embedding is the SUM of one embedding per codebook level (plus what `T2SModel` adds: speaker,
progress, text window); its output goes through one head per level (cross-entropy per level). So a step is one
position whatever the number of levels; the levels of a frame are laid out in time by the delay pattern
(`speechless.t2s.frames`).

Generation (`generate`) is batched (left-padded text), greedy or sampled (temperature, top-k), capped at `max_frames`,
with the backbone's KV cache (`past_key_values`) or, for comparison, without it (the whole sequence every step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speechless.t2s.frames import Batch, frame_token_index
from speechless.t2s.model import T2SModel


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, guidance: float, eoa: int) -> torch.Tensor:
    """Classifier-free guidance u + w (c - u) over the codes (B, Q, V), except the end: level 0's end-of-audio logit
    is set so that the odds of ending against going on are the text-conditioned model's own. Guidance is meant to
    change what is said, not when it stops (the length comes from the progress conditioning both branches share);
    amplified, the end logit made the demo model stop after one frame on 30 of 150 held-out texts at w = 3."""
    guided = uncond + guidance * (cond - uncond)
    codes = torch.ones(cond.shape[-1], dtype=torch.bool, device=cond.device)
    codes[eoa] = False
    guided[:, 0, eoa] = cond[:, 0, eoa] - cond[:, 0, codes].logsumexp(-1) + guided[:, 0, codes].logsumexp(-1)
    return guided


@dataclass
class _Decoding:
    """One autoregressive `generate` call in progress. The backbone runs the rows of `tids` (with guidance, twice the
    `b` texts: rows b.. are the same texts without their text); every step adds to `inputs`, `mask`, `positions` and
    the KV cache `past`, and `hidden` holds the last run's hidden states."""

    b: int
    max_frames: int
    min_frames: int
    forced_end: torch.Tensor | None  # (b,) the step where level 0 must say EOA (duration predictor), or None
    guidance: float
    temperature: float
    top_k: int
    generator: torch.Generator | None
    use_cache: bool
    tids: torch.Tensor
    tmask: torch.Tensor
    spk: torch.Tensor
    frames: torch.Tensor  # frames each row's progress is counted against
    table: torch.Tensor | None  # the aligned token of every step (alignment 'ctc'), or None
    delays: torch.Tensor  # (Q,)
    prefix: torch.Tensor
    text_pos: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    inputs: list[torch.Tensor]
    past: object
    first: torch.Tensor
    hidden: torch.Tensor | None = None

    def window(self, lo: int, hi: int) -> torch.Tensor | None:
        return self.table[:, lo:hi] if self.table is not None else None


class AutoregressiveT2S(T2SModel):
    """Summed level embeddings in, per-level heads out, frame by frame; see the module docstring."""

    parallel = False

    def _init_code_inputs(self) -> None:
        num_levels, hidden = self.num_levels, self.hidden
        self.in_vocab = self.codebook_size + 3  # codes, EOA, PAD, BOA
        self.out_vocab = self.codebook_size + 1  # codes, EOA
        self.level_embed = torch.nn.Embedding(num_levels * self.in_vocab, hidden)
        torch.nn.init.normal_(self.level_embed.weight, std=0.02 / math.sqrt(num_levels))
        self.register_buffer("level_offsets", torch.arange(num_levels) * self.in_vocab, persistent=False)

    def _init_heads(self) -> None:
        num_levels, hidden, rank = self.num_levels, self.hidden, self.cfg.head_rank
        self.head_in = None
        if rank is None:
            self.head_out = torch.nn.Parameter(torch.randn(num_levels, hidden, self.out_vocab) * hidden ** -0.5)
        else:
            self.head_in = torch.nn.Linear(hidden, num_levels * rank)
            self.head_out = torch.nn.Parameter(torch.randn(num_levels, rank, self.out_vocab) * rank ** -0.5)
        self.head_bias = torch.nn.Parameter(torch.zeros(num_levels, self.out_vocab))

    # ------------------------------------------------------------------ forward
    def _code_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        """The sum of one embedding per level (in training, each dropped with probability cfg.code_dropout)."""
        codes = self.level_embed(tokens + self.level_offsets)
        if self.training and self.cfg.code_dropout:
            codes = codes * (torch.rand(codes.shape[:-1], device=codes.device) >= self.cfg.code_dropout)[..., None]
        return codes.sum(-2)

    def _head_inputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., Q, R): what each level's head reads (R = head_rank, or H with full heads)."""
        h = self.head_norm(hidden)
        if self.head_in is not None:
            return self.head_in(h).unflatten(-1, (self.num_levels, -1))
        return h.unsqueeze(-2).expand(*h.shape[:-1], self.num_levels, h.shape[-1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., Q, codebook + 1) logits of every level."""
        h = self._head_inputs(hidden)
        return torch.einsum("...qr,qrv->...qv", h, self.head_out.to(h.dtype)) + self.head_bias.to(h.dtype)

    def _decoder_loss(self, batch: Batch, hidden: torch.Tensor, valid: torch.Tensor) -> dict:
        """Weighted mean of per-level cross-entropies over the audio steps: {'loss', 'level_loss' (Q,), 'level_count' (Q,)}."""
        h = hidden[valid]  # (N, H): only real audio steps reach the heads
        targets = batch.targets[valid]  # (N, Q)
        logits = self.logits(h).float()
        per = F.cross_entropy(logits.reshape(-1, self.out_vocab), targets.reshape(-1), ignore_index=-100, reduction="none")
        per = per.view(targets.shape)
        counted = (targets != -100).float()
        level_sum = (per * counted).sum(0)
        level_count = counted.sum(0)
        level_loss = level_sum / level_count.clamp_min(1)
        loss = (level_loss * self.level_weights).mean()
        return {"loss": loss, "level_loss": level_loss.detach(), "level_count": level_count.detach()}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def _decode(self, text_ids: list[list[int]], tids: torch.Tensor, tmask: torch.Tensor, spk: torch.Tensor, *,
                max_frames: int, temperature: float, top_k: int, use_cache: bool, generator: torch.Generator | None,
                min_frames: int, target_frames: list[int] | None, guidance: float) -> tuple[list[torch.Tensor], list[bool]]:
        """Step by step until every row has said EOA on level 0 (or hit `max_frames`) and its later levels caught up."""
        b, q, device = len(text_ids), self.num_levels, self.device
        frames, forced_end, predicted, table = self._lengths(text_ids, tids, tmask, spk, max_frames, target_frames)
        run = self._start(tids, tmask, spk, frames, table, b=b, max_frames=max_frames, min_frames=min_frames,
                          forced_end=forced_end, guidance=guidance, temperature=temperature, top_k=top_k,
                          generator=generator, use_cache=use_cache)
        codes = torch.zeros(b, q, max_frames, dtype=torch.long, device=device)
        end = torch.full((b,), -1, dtype=torch.long, device=device)  # frames of each row once level 0 said EOA
        capped = torch.zeros(b, dtype=torch.bool, device=device)
        if forced_end is not None:
            capped |= predicted > max_frames
        rows = torch.arange(b, device=device)
        dmax = max(self.delays)
        step = 0
        while True:
            tokens = self._next_tokens(run, step)  # (B, Q)
            ended = end >= 0
            newly = (~ended) & (tokens[:, 0] == self.eoa)
            at_cap = (~ended) & (~newly) & (step >= max_frames)
            end = torch.where(newly | at_cap, torch.full_like(end, step), end)
            capped |= at_cap
            tokens = self._past_the_ends(run, tokens, step, end)
            for level in range(q):
                fl = step - self.delays[level]
                if 0 <= fl < max_frames:
                    keep = (end < 0) | (fl < end)
                    codes[rows[keep], level, fl] = tokens[keep, level]
            done = (end >= 0) & (step >= end + max(dmax - 1, 0))
            if bool(done.all()):
                break
            step += 1
            self._advance(run, tokens, step)
        out = [codes[row, :, : int(end[row])].cpu() for row in range(b)]
        return out, capped.cpu().tolist()

    def _lengths(self, text_ids: list[list[int]], tids: torch.Tensor, tmask: torch.Tensor, spk: torch.Tensor,
                 max_frames: int, target_frames: list[int] | None):
        """(frames (B,) each row's progress is counted against, the forced end (B,), the predicted frames (B,) and the
        aligned token of every step (B, S)); the last three only with a duration predictor, None otherwise."""
        table = forced_end = predicted = None
        if self.duration_predictor is not None:  # every token spoken for its predicted frames; the end follows
            durations = self._spoken_durations(tids, tmask, spk, target_frames)
            predicted = durations.sum(-1)
            target_frames = predicted.tolist()
            forced_end = predicted.clamp(max=max_frames)
            table = frame_token_index(durations, max_frames + max(self.delays) + 2)
        elif target_frames is None and self.progress_embed is not None:
            target_frames = [self.predict_frames(ids, int(s)) for ids, s in zip(text_ids, spk.tolist())]
        frames = torch.tensor(target_frames or [1] * len(text_ids), dtype=torch.long, device=self.device).clamp(1, max_frames)
        return frames, forced_end, predicted, table

    def _start(self, tids: torch.Tensor, tmask: torch.Tensor, spk: torch.Tensor, frames: torch.Tensor,
               table: torch.Tensor | None, **settings) -> _Decoding:
        """The rows to run (doubled with guidance) and the backbone's run over the text and the first (BOA) step;
        `settings`: the rest of `_Decoding`'s fields (those of the `generate` call)."""
        device, q = self.device, self.num_levels
        if settings["guidance"] != 1.0:  # rows b.. are the same rows without their text
            tids, tmask, spk, frames = torch.cat([tids, tids]), torch.cat([tmask, torch.zeros_like(tmask)]), spk.repeat(2), frames.repeat(2)
            table = table.repeat(2, 1) if table is not None else None
        mb = tids.shape[0]  # rows the model runs
        delays = torch.tensor(self.delays, device=device)
        step_tokens = torch.full((mb, 1, q), self.boa, dtype=torch.long, device=device)
        prefix = self._text_embeds(tids)
        mask = torch.cat([tmask, torch.ones(mb, 1, dtype=torch.long, device=device)], 1)
        text_pos = self._text_positions(tmask)
        positions = torch.cat([text_pos, self._audio_positions(tmask, torch.zeros(mb, 1, dtype=torch.long, device=device))], 1)
        past = None
        if settings["use_cache"]:
            from transformers import DynamicCache

            past = DynamicCache(config=self.lm.config)
        run = _Decoding(**settings, tids=tids, tmask=tmask, spk=spk, frames=frames, table=table, delays=delays,
                        prefix=prefix, text_pos=text_pos, mask=mask, positions=positions, inputs=[step_tokens], past=past,
                        first=torch.zeros(mb, 1, dtype=torch.long, device=device))
        run.hidden, run.past = self._run(torch.cat([prefix, self._audio_embeds(
            step_tokens, spk, run.first, frames, tids, tmask, run.window(0, 1))], 1), mask, positions, past)
        return run

    def _next_tokens(self, run: _Decoding, step: int) -> torch.Tensor:
        """(B, Q) tokens of audio step `step` from the last hidden states (guided: from u + w (c - u)). Levels > 0 never
        end by themselves; level 0 may end after min_frames (and must at the cap; at `forced_end` exactly with one)."""
        logits = self.logits(run.hidden[:, -1]).float()  # (B, Q, V)
        if run.guidance != 1.0:
            logits = guided_logits(logits[:run.b], logits[run.b:], run.guidance, self.eoa)
        logits[:, 1:, self.eoa] = -math.inf
        if step < run.min_frames:
            logits[:, 0, self.eoa] = -math.inf
        forced_end = run.forced_end
        if forced_end is not None:
            logits[:, 0, self.eoa] = torch.where(step < forced_end, -math.inf, logits[:, 0, self.eoa])
        tokens = self._pick(logits, run.temperature, run.top_k, run.generator)  # (B, Q)
        if forced_end is not None:
            tokens[:, 0] = torch.where(step == forced_end, self.eoa, tokens[:, 0])
        return tokens

    def _past_the_ends(self, run: _Decoding, tokens: torch.Tensor, step: int, end: torch.Tensor) -> torch.Tensor:
        """`tokens` (B, Q) with the positions past a row's end replaced (EOA at the end frame, PAD after) and BOA
        before a level's first frame."""
        b, q = tokens.shape
        f = (step - run.delays).unsqueeze(0).expand(b, q)  # the frame each level is at
        e = end.unsqueeze(1).expand(b, q)
        has_end = e >= 0
        tokens = torch.where(has_end & (f == e), torch.full_like(tokens, self.eoa), tokens)
        tokens = torch.where(has_end & (f > e), torch.full_like(tokens, self.pad), tokens)
        return torch.where(f < 0, torch.full_like(tokens, self.boa), tokens)

    def _advance(self, run: _Decoding, tokens: torch.Tensor, step: int) -> None:
        """Feed `tokens` (B, Q) as the input of audio step `step`: the backbone runs that step (with the KV cache) or
        the whole sequence again (without)."""
        device = self.device
        mb = run.tids.shape[0]
        step_tokens = tokens.unsqueeze(1).repeat(mb // run.b, 1, 1)
        run.inputs.append(step_tokens)
        run.mask = torch.cat([run.mask, torch.ones(mb, 1, dtype=torch.long, device=device)], 1)
        if run.use_cache:
            run.positions = run.positions[:, -1:] + 1
            run.hidden, run.past = self._run(self._audio_embeds(step_tokens, run.spk, run.first + step, run.frames, run.tids,
                                                                run.tmask, run.window(step, step + 1)),
                                             run.mask, run.positions, run.past)
        else:
            steps_so_far = torch.arange(step + 1, device=device).expand(mb, -1)
            run.positions = torch.cat([run.text_pos, self._audio_positions(run.tmask, steps_so_far)], 1)
            embeds = torch.cat([run.prefix, self._audio_embeds(torch.cat(run.inputs, 1), run.spk, steps_so_far, run.frames,
                                                               run.tids, run.tmask, run.window(0, step + 1))], 1)
            run.hidden, _ = self._run(embeds, run.mask, run.positions)

    def _pick(self, logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        scaled = logits / temperature
        if top_k > 0 and top_k < scaled.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        probs = scaled.softmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        if flat.device.type != "cpu" and generator is not None and generator.device.type == "cpu":
            picks = torch.multinomial(flat.cpu(), 1, generator=generator).to(flat.device)
        else:
            picks = torch.multinomial(flat, 1, generator=generator)
        return picks.view(probs.shape[:-1])
