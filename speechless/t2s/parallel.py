"""The parallel stage-2 decoder (`model.decoder: parallel`): every frame at once from the text aligned to it.

Non-autoregressive like FastSpeech: an audio step reads no codes, only its place, its voice and the text window around
the token the duration predictor puts there (alignment 'ctc', frame_mode 'parallel'). The model regresses each frame's
decoded stage-1 vector (squared error, stage 1's standardised units) and stage 1's own codebooks, kept with the
weights, turn the predicted vectors into codes: one forward pass per text, deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speechless.core.errors import UsageError
from speechless.t2s.frames import Batch, frame_token_index
from speechless.t2s.model import T2SModel


class ParallelT2S(T2SModel):
    """Stage-1 vectors of every frame at once; see the module docstring."""

    parallel = True

    def _init_stage1_inputs(self, codebooks: torch.Tensor | None = None, vector_dim: int | None = None) -> None:
        """Stage 1's codebooks (Q, K, D): given (a fresh model) or zeros of vector size `vector_dim` (to load into)."""
        cfg, num_levels, codebook_size = self.cfg, self.num_levels, self.codebook_size
        if cfg.alignment != "ctc" or cfg.frame_mode != "parallel":
            raise UsageError("model.decoder 'parallel' predicts every frame from the text aligned to it: set "
                             "model.alignment: ctc and model.frame_mode: parallel")
        if codebooks is None and vector_dim is None:
            raise UsageError("model.decoder 'parallel' regresses stage-1 vectors: build the model with the stage-1 codebooks")
        shape = tuple(codebooks.shape) if codebooks is not None else (num_levels, codebook_size, int(vector_dim))
        if shape[:2] != (num_levels, codebook_size):
            raise UsageError(f"stage-1 codebooks of shape {shape}; expected ({num_levels}, {codebook_size}, D)")
        # Stage 1's codebooks (standardised units), kept with the weights so the checkpoint speaks on its own.
        self.register_buffer("codebooks", codebooks.float().clone() if codebooks is not None else torch.zeros(shape))

    def _init_heads(self) -> None:
        self.vector_head = torch.nn.Linear(self.hidden, self.codebooks.shape[-1])

    @classmethod
    def saved_inputs(cls, meta: dict) -> dict:
        return {"vector_dim": meta.get("vector_dim")}

    def config_dict(self) -> dict:
        return {**super().config_dict(), "vector_dim": int(self.codebooks.shape[-1])}

    # ------------------------------------------------------------------ forward
    def _code_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        """Zeros: the step knows its place and its text, not the codes."""
        return torch.zeros(*tokens.shape[:2], self.hidden, device=tokens.device, dtype=self.head_norm.weight.dtype)

    def vectors(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., D): the parallel decoder's stage-1 vectors (standardised units)."""
        return self.vector_head(self.head_norm(hidden))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, Q) codes -> (N, D): the sum of their stage-1 codewords (standardised units, what stage 3 reads)."""
        return self.codebooks[torch.arange(self.num_levels, device=codes.device), codes].sum(-2)

    def encode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, D) standardised vectors -> (N, Q) stage-1 codes (stage 1's own greedy residual assignment)."""
        from speechless.speech.rvq import residual_codes

        books = self.codebooks.float()
        return residual_codes(vectors.float().clone(), books, (books * books).sum(-1))

    def _decoder_loss(self, batch: Batch, hidden: torch.Tensor, valid: torch.Tensor) -> dict:
        """Squared error of the vectors of the real frames (not the end-of-audio step) to the decoded stage-1 vectors:
        {'loss', 'vector_mse', 'frames'}."""
        valid = valid & (batch.targets[..., 0] >= 0) & (batch.targets[..., 0] < self.codebook_size)
        targets = batch.targets[valid]  # (N, Q)
        predicted = self.vectors(hidden[valid]).float()
        mse = F.mse_loss(predicted, self.decode_codes(targets))
        return {"loss": mse, "vector_mse": mse.detach(), "frames": valid.sum().detach()}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def _decode(self, text_ids: list[list[int]], tids: torch.Tensor, tmask: torch.Tensor, spk: torch.Tensor, *,
                max_frames: int, target_frames: list[int] | None, guidance: float,
                **sampling) -> tuple[list[torch.Tensor], list[bool]]:
        """Predicted durations, then every frame in one forward pass (guided: u + w (c - u) on the vectors), then stage
        1's codes of each vector. `sampling` (temperature, top_k, use_cache, generator, min_frames) plays no part."""
        device = self.device
        b, lt = tids.shape
        durations = self._spoken_durations(tids, tmask, spk, target_frames)
        predicted = durations.sum(-1)
        frames = predicted.clamp(max=max_frames)
        steps_n = int(frames.max())
        steps = torch.arange(steps_n, device=device).expand(b, -1)
        table = frame_token_index(durations, steps_n)
        audio_mask = (steps < frames[:, None]).long()
        if guidance != 1.0:  # rows b.. are the same rows without their text
            tids, spk, frames, table, audio_mask = (torch.cat([tids, tids]), spk.repeat(2), frames.repeat(2),
                                                    table.repeat(2, 1), audio_mask.repeat(2, 1))
            steps, tmask = steps.repeat(2, 1), torch.cat([tmask, torch.zeros_like(tmask)])
        dummy = torch.zeros(*steps.shape, self.num_levels, dtype=torch.long, device=device)
        embeds = torch.cat([self._text_embeds(tids), self._audio_embeds(dummy, spk, steps, frames, tids, tmask, table)], 1)
        positions = torch.cat([self._text_positions(tmask), self._audio_positions(tmask, steps)], 1)
        hidden, _ = self._run(embeds, torch.cat([tmask, audio_mask], 1), positions)
        vectors = self.vectors(hidden[:, lt:]).float()
        if guidance != 1.0:
            vectors = vectors[b:] + guidance * (vectors[:b] - vectors[b:])
        codes = self.encode_vectors(vectors.reshape(-1, vectors.shape[-1])).view(b, steps_n, self.num_levels)
        out = [codes[row, : int(frames[row])].T.contiguous().cpu() for row in range(b)]
        return out, (predicted > max_frames).cpu().tolist()
