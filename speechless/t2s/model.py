"""Stage 2 model: text -> stage-1 semantic tokens ("Speechless"), a decoder-only transformer over whole frames.

Sequence layout (one row)::

    [text tokens ...] [audio step 0] [audio step 1] ... [audio step S-1]

Text positions are embedded with the backbone's own input embeddings; an audio step is one position (plus an optional
speaker embedding, progress embedding and text window), and the backbone is any Hugging Face causal LM driven through
`inputs_embeds` (its LM head is never used). `T2SModel` holds what both decoders share; the decoder itself
(`model.decoder`) is a subclass: `AutoregressiveT2S` (`speechless.t2s.autoregressive`: the step's codes in, one head
per level out, frame by frame) or `ParallelT2S` (`speechless.t2s.parallel`: every frame at once, regressing stage-1
vectors). `build_model` and `T2SModel.load` pick the one the config names.

The schema is `speechless.t2s.config.T2SConfig`; persistence (`save`, `load`) is `speechless.t2s.checkpoint`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from speechless.core.errors import UsageError
from speechless.t2s.backbone import load_backbone, pretrained_tokenizer_file
from speechless.t2s.checkpoint import T2SCheckpoint
from speechless.t2s.config import T2SConfig
from speechless.t2s.duration import DurationModel, DurationPredictor, frames_from_log
from speechless.t2s.frames import Batch, constant_rate_index, delays_for, progress_buckets, scale_durations
from speechless.t2s.text import TextEncoder, normalize_text, train_text_tokenizer


class T2SModel(T2SCheckpoint, torch.nn.Module):
    """What both stage-2 decoders share: the backbone, the text, speaker and progress embeddings, the text window, the
    duration predictor, the heads' layer norm, the duration part of the loss, generation's input checks and
    persistence. A decoder subclass adds its own inputs and heads (the `_init_*` hooks, called in construction order),
    its code embeddings (`_code_embeds`), loss (`_decoder_loss`) and generation (`_decode`); see the module docstring."""

    parallel: bool
    """True for the parallel decoder (every frame at once), False for the autoregressive one."""

    def __init__(self, cfg: T2SConfig, backbone, text: TextEncoder, num_levels: int, codebook_size: int,
                 speakers: list[str], stage1: dict, backbone_source: dict | None = None,
                 duration: DurationModel | None = None, **decoder_inputs):
        """`decoder_inputs`: what the decoder's `_init_stage1_inputs` takes (the parallel decoder: stage 1's codebooks)."""
        super().__init__()
        self.duration = duration
        """Predicts an utterance's frames from its text (needed when cfg.progress_buckets > 0)."""
        self.cfg = cfg
        self.text = text
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.speakers = list(speakers)
        self.stage1 = dict(stage1)
        """{'revision': sha256 of the stage-1 weights these codes belong to, 'ref': the folder or store ref used}."""
        self.backbone_source = backbone_source or {}
        self.delays = delays_for(cfg.frame_mode, num_levels)
        self._init_stage1_inputs(**decoder_inputs)
        self.lm = backbone.float()
        if cfg.freeze_text_embeddings:
            self.lm.get_input_embeddings().weight.requires_grad_(False)
        hidden = backbone.config.hidden_size
        self.hidden = hidden
        self._init_code_inputs()
        self.speaker_embed = torch.nn.Embedding(max(len(self.speakers), 1), hidden) if cfg.speaker_embedding and self.speakers else None
        if self.speaker_embed is not None:
            torch.nn.init.normal_(self.speaker_embed.weight, std=0.02)
        self.progress_embed = None
        if cfg.progress_buckets:
            if duration is None and cfg.alignment == "constant_rate":
                raise UsageError("model.progress_buckets needs a duration model: build the model from training data with frames")
            self.progress_embed = torch.nn.Embedding(cfg.progress_buckets, hidden)
            torch.nn.init.normal_(self.progress_embed.weight, std=0.02)
        self.text_window_proj = None
        self.duration_predictor = None
        if cfg.alignment == "ctc":
            if not cfg.text_window:
                raise UsageError("model.alignment 'ctc' places the text window: set model.text_window > 0")
            self.duration_predictor = DurationPredictor(hidden, len(self.speakers), cfg.dropout)
        if cfg.text_window:
            if cfg.alignment == "constant_rate" and not cfg.progress_buckets:
                raise UsageError("model.text_window with model.alignment 'constant_rate' needs model.progress_buckets > 0 "
                                 "(it places the text by the utterance's length)")
            self.text_window_proj = torch.nn.Linear((2 * cfg.text_window + 1) * hidden, hidden, bias=False)
            torch.nn.init.normal_(self.text_window_proj.weight, std=0.02 / math.sqrt(2 * cfg.text_window + 1))
        self.head_norm = torch.nn.LayerNorm(hidden)
        self._init_heads()
        weights = torch.tensor(cfg.level_loss_weights if cfg.level_loss_weights else [1.0] * num_levels, dtype=torch.float32)
        if weights.numel() != num_levels or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise UsageError(f"model.level_loss_weights: need {num_levels} non-negative weights with a positive sum")
        self.register_buffer("level_weights", weights * num_levels / weights.sum(), persistent=False)
        self.dropout = torch.nn.Dropout(cfg.dropout)

    # ------------------------------------------------------------------ decoder hooks
    def _init_stage1_inputs(self) -> None:
        """Construction, before the backbone: what the decoder keeps of stage 1 (nothing by default)."""

    def _init_code_inputs(self) -> None:
        """Construction, after the backbone: how an audio step reads its codes."""

    def _init_heads(self) -> None:
        """Construction, after `head_norm`: the output heads."""
        raise NotImplementedError

    def _code_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S, Q) tokens of audio steps -> (B, S, H): what each step reads of its input codes."""
        raise NotImplementedError

    def _decoder_loss(self, batch: Batch, hidden: torch.Tensor, valid: torch.Tensor) -> dict:
        """The decoder's loss from the hidden states (B, S, H) of the audio steps, `valid` (B, S) the real ones."""
        raise NotImplementedError

    def _decode(self, text_ids: list[list[int]], tids: torch.Tensor, tmask: torch.Tensor, spk: torch.Tensor, *,
                max_frames: int, temperature: float, top_k: int, use_cache: bool, generator: torch.Generator | None,
                min_frames: int, target_frames: list[int] | None, guidance: float) -> tuple[list[torch.Tensor], list[bool]]:
        """`generate` for the left-padded texts `tids` (B, Lt) (mask `tmask`) in voices `spk` (B,)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ ids
    @property
    def eoa(self) -> int:
        return self.codebook_size

    @property
    def pad(self) -> int:
        return self.codebook_size + 1

    @property
    def boa(self) -> int:
        return self.codebook_size + 2

    @property
    def decoder(self):
        """The backbone without its LM head (hidden states out)."""
        return self.lm.base_model

    @property
    def device(self) -> torch.device:
        return self.head_norm.weight.device

    def speaker_index(self, speaker: str | None) -> int:
        """Index of a speaker name; None = the first speaker. Unknown names are a UsageError listing the known ones."""
        if not self.speakers or self.speaker_embed is None:
            return 0
        if speaker is None:
            return 0
        if speaker not in self.speakers:
            raise UsageError(f"speaker {speaker!r}: unknown; this model knows {', '.join(self.speakers)}")
        return self.speakers.index(speaker)

    # ------------------------------------------------------------------ forward
    def _audio_embeds(self, tokens: torch.Tensor, speakers: torch.Tensor, steps: torch.Tensor, frames: torch.Tensor,
                      text_ids: torch.Tensor, text_mask: torch.Tensor, frame_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, Q) tokens of audio steps `steps` (B, S) of utterances of `frames` (B,) frames -> (B, S, H): the
        decoder's embedding of the codes (+ speaker, + progress, + the text window of cfg.text_window around the token
        spoken at each step: `frame_tokens` (B, S) with alignment 'ctc', the constant-rate token otherwise)."""
        emb = self._code_embeds(tokens)
        if self.speaker_embed is not None:
            emb = emb + self.speaker_embed(speakers)[:, None, :]
        if self.progress_embed is not None:
            emb = emb + self.progress_embed(progress_buckets(steps, frames, self.progress_embed.num_embeddings))
        if self.text_window_proj is not None:
            if frame_tokens is None:
                frame_tokens = constant_rate_index(text_mask, steps, frames)
            emb = emb + self._text_window(text_ids, text_mask, frame_tokens)
        return self.dropout(emb)

    def _text_window(self, text_ids: torch.Tensor, text_mask: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """(B, S, H): the text embeddings around each step's token `window_index` (B, S) (see T2SConfig.text_window),
        mapped to H."""
        width = self.cfg.text_window
        offsets = torch.arange(-width, width + 1, device=window_index.device)
        index = window_index[..., None] + offsets  # (B, S, 2W + 1)
        first = (text_mask.shape[1] - text_mask.sum(-1))[:, None, None]
        inside = (index >= first) & (index < text_mask.shape[1])
        index = index.clamp(0, text_mask.shape[1] - 1)
        tokens = torch.gather(text_ids[:, None, :].expand(-1, index.shape[1], -1), 2, index)
        window = self._text_embeds(tokens) * inside[..., None].to(self.head_norm.weight.dtype)
        return self.text_window_proj(window.flatten(-2))

    def predict_frames(self, text_ids: list[int], speaker: int) -> int:
        """The duration model's frames for one text (token ids) in one speaker's voice."""
        name = self.speakers[speaker] if self.speaker_embed is not None else ""
        return self.duration.predict(self.text.tokenizer.decode(text_ids), name)

    def _text_embeds(self, text_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(text_ids)

    def _text_positions(self, text_mask: torch.Tensor) -> torch.Tensor:
        return (text_mask.cumsum(-1) - 1).clamp_min(0)

    def _audio_positions(self, text_mask: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Positions of audio steps `steps` (B, S) (0-based step numbers)."""
        return text_mask.sum(-1, keepdim=True) + steps

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past=None):
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=past,
                           use_cache=past is not None)
        return out.last_hidden_state, out.past_key_values

    def _teacher_forced(self, batch: Batch, text_mask: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, Lt + S, H) of the text (the tokens of `text_mask`) and the audio steps reading the real
        codes of `batch.audio_in` (B, S, Q)."""
        embeds = torch.cat([self._text_embeds(batch.text_ids), self._audio_embeds(
            batch.audio_in, batch.speakers, steps, batch.frames, batch.text_ids, text_mask, batch.frame_tokens)], 1)
        mask = torch.cat([text_mask, batch.audio_mask], 1)
        positions = torch.cat([self._text_positions(text_mask), self._audio_positions(text_mask, steps)], 1)
        return self._run(embeds, mask, positions)[0]

    def _drop_rows(self, mask: torch.Tensor, prob: float) -> torch.Tensor:
        """In training, `mask` (B, L) with each row zeroed with probability `prob`; otherwise `mask` itself."""
        if not (self.training and prob):
            return mask
        return mask * (torch.rand(mask.shape[0], device=mask.device) >= prob)[:, None]

    def loss(self, batch: Batch) -> dict:
        """The decoder's loss over the audio steps (see `_decoder_loss`) plus, with alignment 'ctc', the duration
        predictor's squared error in log(1 + frames) ('duration_loss', 'duration_count')."""
        steps = (batch.audio_mask.cumsum(-1) - 1).clamp_min(0)
        text_mask = self._drop_rows(batch.text_mask, self.cfg.unconditional_prob)  # the text, window included
        hidden = self._teacher_forced(batch, text_mask, steps)
        lt = batch.text_ids.shape[1]
        out = self._decoder_loss(batch, hidden[:, lt:], batch.audio_mask.bool())
        if self.duration_predictor is not None:
            if batch.durations is None:
                raise UsageError("model.alignment 'ctc': training items need token durations (the aligned frames of each token)")
            predicted = self.duration_predictor(self._text_embeds(batch.text_ids), batch.text_mask, batch.speakers).float()
            real = batch.text_mask.bool()
            duration_loss = F.mse_loss(predicted[real], torch.log1p(batch.durations[real].float()))
            out.update(loss=out["loss"] + duration_loss, duration_loss=duration_loss.detach(), duration_count=real.sum().detach())
        return out

    def predict_durations(self, text_ids: torch.Tensor, text_mask: torch.Tensor, speakers: torch.Tensor) -> torch.Tensor:
        """(B, Lt) whole frames of every token of left-padded texts (alignment 'ctc'), 0 on padding."""
        log_d = self.duration_predictor(self._text_embeds(text_ids), text_mask, speakers)
        return frames_from_log(log_d, text_mask)

    def _spoken_durations(self, tids: torch.Tensor, tmask: torch.Tensor, spk: torch.Tensor,
                          target_frames: list[int] | None) -> torch.Tensor:
        """(B, Lt) frames each token is spoken for in generation (alignment 'ctc'): the predicted durations, stretched
        to `target_frames` when given, and at least one frame per row."""
        durations = self.predict_durations(tids, tmask, spk)
        if target_frames is not None:
            durations = scale_durations(durations, torch.tensor(target_frames, device=self.device))
        durations[:, -1] += (durations.sum(-1) < 1).long()  # at least one frame
        return durations

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, text_ids: list[list[int]], speakers: list[int] | None = None, max_frames: int = 750,
                 temperature: float = 0.0, top_k: int = 0, use_cache: bool = True, generator: torch.Generator | None = None,
                 min_frames: int = 1, target_frames: list[int] | None = None, guidance: float = 1.0) -> tuple[list[torch.Tensor], list[bool]]:
        """Codes (Q, T_i) for each text (token ids), in one batch; and whether each hit `max_frames` without EOA.

        temperature 0 = greedy; otherwise softmax sampling at that temperature, restricted to the top_k codes when
        top_k > 0. use_cache=False recomputes the whole sequence at every step (same result, for speed comparison).
        With progress buckets, `target_frames` is each text's length the progress is counted against (None = the
        duration model's prediction). guidance w != 1 (classifier-free guidance; needs a model trained with
        unconditional_prob > 0) runs every row twice, with and without its text, and picks from u + w (c - u).
        The parallel decoder is one deterministic pass: it has no use for the sampling and caching options.
        """
        if not text_ids:
            return [], []
        if max_frames < 1:
            raise UsageError(f"max_frames must be >= 1, got {max_frames}")
        guided = guidance != 1.0
        if guided and not self.cfg.unconditional_prob:
            raise UsageError(f"guidance {guidance:g} needs a model trained with model.unconditional_prob > 0 (this one: 0); "
                             "use guidance 1 or retrain")
        self.eval()
        tids, tmask = _left_padded(text_ids, self.device)
        spk = torch.tensor(speakers if speakers is not None else [0] * len(text_ids), dtype=torch.long, device=self.device)
        return self._decode(text_ids, tids, tmask, spk, max_frames=max_frames, temperature=temperature, top_k=top_k,
                            use_cache=use_cache, generator=generator, min_frames=min_frames, target_frames=target_frames,
                            guidance=guidance)

def _left_padded(text_ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, Lt): the texts left-padded with 0 to the longest one."""
    b = len(text_ids)
    lt = max(len(ids) for ids in text_ids)
    tids = torch.zeros(b, lt, dtype=torch.long, device=device)
    tmask = torch.zeros(b, lt, dtype=torch.long, device=device)
    for row, ids in enumerate(text_ids):
        if not ids:
            raise UsageError("generate: an empty token list; encode text with model.text.encode first")
        tids[row, lt - len(ids):] = torch.tensor(ids, device=device)
        tmask[row, lt - len(ids):] = 1
    return tids, tmask


def build_model(cfg: T2SConfig, train_texts: list[str], num_levels: int, codebook_size: int, speakers: list[str],
                stage1: dict, seed: int = 0, train_frames: list[int] | None = None,
                train_speakers: list[str] | None = None, codebooks: torch.Tensor | None = None) -> T2SModel:
    """A fresh model: the text tokenizer (trained on `train_texts` or loaded), the backbone, the level embeddings/heads."""
    from tokenizers import Tokenizer

    known = "".join(sorted({ch for t in train_texts for ch in normalize_text(t)} - {" "}))
    if cfg.tokenizer is not None:
        if not Path(cfg.tokenizer).is_file():
            raise UsageError(f"model.tokenizer {cfg.tokenizer}: file not found")
        tokenizer = Tokenizer.from_file(cfg.tokenizer)
    elif cfg.backbone.endswith(".json"):
        tokenizer = train_text_tokenizer(train_texts, cfg.tokenizer_vocab_size)
    else:
        tokenizer = Tokenizer.from_file(str(pretrained_tokenizer_file(cfg)))
    text = TextEncoder(tokenizer, known, cfg.max_text_tokens)
    backbone, source = load_backbone(cfg, text.vocab_size if cfg.backbone.endswith(".json") else None, seed)
    if backbone.get_input_embeddings().num_embeddings < text.vocab_size:
        raise UsageError(f"model.tokenizer has {text.vocab_size} tokens but the backbone embeds only "
                         f"{backbone.get_input_embeddings().num_embeddings}")
    duration = None
    if cfg.progress_buckets and train_frames:
        duration = DurationModel.fit([normalize_text(t) for t in train_texts], train_frames,
                                     train_speakers or [""] * len(train_texts))
    torch.manual_seed(seed + 1)
    decoder = decoder_class(cfg.decoder)
    return decoder(cfg, backbone, text, num_levels, codebook_size, speakers, stage1, source, duration,
                   **({"codebooks": codebooks} if decoder.parallel else {}))


def decoder_class(decoder: str) -> type[T2SModel]:
    """The `T2SModel` subclass of a `model.decoder` value."""
    if decoder == "parallel":
        from speechless.t2s.parallel import ParallelT2S

        return ParallelT2S
    from speechless.t2s.autoregressive import AutoregressiveT2S

    return AutoregressiveT2S
