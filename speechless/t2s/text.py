"""Stage-2 text handling: normalisation, the text tokenizer and the encoder that checks and chunks input text.

Text is tokenized with a `tokenizers` tokenizer (`tokenizer.json`): trained on the stage-2 training text for a random-
weight backbone, or the pretrained backbone's own. Characters never seen in the training text are dropped with a
warning; text longer than `max_text_tokens` is split at word boundaries into chunks generated one after the other.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from speechless.core.errors import UsageError

TEXT_SPECIALS = ["[PAD]", "[UNK]"]


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

