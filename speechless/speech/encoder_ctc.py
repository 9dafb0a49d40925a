"""Training a Gemma 4 audio encoder so that it hears: a CTC head on the vectors stage 1 quantizes.

The demo has no pretrained Gemma 4 weights, and a random-weight `Gemma4AudioModel` keeps little of each word in its
vectors. This module trains one (the same class, the same hook point) with a linear CTC head over text units put on
the INPUT of `output_proj` (what stage 1 captures), so that those vectors carry the words.

Pieces (the recipe `stages/stage0_encoder.py` puts them together):

* units: `alphabet_from` (characters of the `probe_text` form of the train transcripts) or espeak-ng phonemes
  (`phonemize`, one `espeak-ng -x` call per text, stress marks removed, ` ` = word boundary);
* `CTCEncoder`: the `Gemma4AudioModel` + the linear head; a forward hook takes `output_proj`'s input, as in stage 1;
* `utterance_features` / `pad_features`: log-mel features per utterance (Gemma's own feature extractor) and batches of
  them zero-padded (the extractor pads with zeros too) to a multiple of `PAD_FRAMES` mel frames;
* `ctc_loss`, `transcribe` (greedy), `evaluate` (dev loss and CER with `speechless.core.metrics.cer`, or the unit error rate
  for phonemes);
* `save_encoder_folder` / `load_ctc_encoder`: the output folder. It is a standalone `Gemma4AudioModel` folder in the
  format `speechless.speech.encoders.load_encoder` reads (`config.json` with `model_type: gemma4_audio`, `model.safetensors`,
  `preprocessor_config.json`), so stage 1 takes it as `encoder.source` like any Gemma 4 checkpoint folder; the head
  lives beside it in `ctc_head.safetensors` + `ctc_head.json` (units), which the encoder loader never reads.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import load_tensors, read_json, save_tensors, write_json, write_text
from speechless.core.metrics import cer, probe_text
from speechless.data.audio import SAMPLE_RATE, load_audio

FORMAT = "speechless-encoder-ctc"
FORMAT_VERSION = 1
HEAD_FILE = "ctc_head.safetensors"
HEAD_CONFIG = "ctc_head.json"
#: One metadata key only (see speechless.t2s.probe): identical weights give identical bytes.
WEIGHTS_METADATA = {"format": "pt"}
PAD_FRAMES = 64
"""Batches are zero-padded to a multiple of this many 10 ms mel frames (few distinct shapes: faster CPU kernels)."""
STRESS_MARKS = "'," + "\u02c8\u02cc" + "|"
"""Stripped from espeak-ng's `-x` phonemes: primary/secondary stress and the '|' it writes between some phonemes."""


# ------------------------------------------------------------------------------------------------------ units


def alphabet_from(texts: Sequence[str]) -> list[str]:
    """The character inventory of the `probe_text` forms of `texts` (space included), sorted."""
    units = sorted({ch for text in texts for ch in probe_text(text)})
    if not units:
        raise UsageError("encoder pretraining: the train transcripts hold no characters after normalisation")
    return units


def char_units(text: str) -> list[str]:
    return list(probe_text(text))


def phonemize(texts: Sequence[str], voice: str) -> list[list[str]]:
    """espeak-ng phonemes of each text (`espeak-ng -v VOICE -q -x --sep=_`), STRESS_MARKS removed, ' ' between words."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise UsageError("data.units 'phonemes' needs espeak-ng (apt-get install espeak-ng); or use units 'chars'")
    cache: dict[str, list[str]] = {}
    out = []
    for text in texts:
        clean = probe_text(text)
        if clean not in cache:
            try:
                done = subprocess.run([binary, "-v", voice, "-q", "-x", "--sep=_", clean], capture_output=True, text=True,
                                      timeout=60, check=True)
            except (OSError, subprocess.SubprocessError) as exc:
                raise RuntimeFailure(f"espeak-ng -v {voice}: failed on {clean[:40]!r} ({exc}); check the voice name") from exc
            units: list[str] = []
            for word in done.stdout.split():
                phones = [p.strip(STRESS_MARKS) for p in word.split("_")]
                phones = [p for p in phones if p]
                if phones:
                    units.extend(([" "] if units else []) + phones)
            cache[clean] = units
        out.append(cache[clean])
    return out


def unit_error_rate(units: Sequence[str], references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """CER for character units (`speechless.core.metrics.cer`); for phonemes the phoneme error rate (edits / reference
    phonemes; references and hypotheses are phoneme strings joined by '_', words by ' ')."""
    if all(len(unit) == 1 for unit in units) and "_" not in "".join(references):
        return cer(list(references), list(hypotheses))
    import jiwer

    def tokens(text: str) -> str:
        return " ".join(p for p in re.split(r"[_ ]+", text.replace(" ", "_|_")) if p)

    refs = [tokens(r) for r in references]
    keep = [i for i, r in enumerate(refs) if r]
    return float(jiwer.wer([refs[i] for i in keep], [tokens(hypotheses[i]) for i in keep]))


# ------------------------------------------------------------------------------------------------------ model


class CTCEncoder(torch.nn.Module):
    """A `Gemma4AudioModel` with a linear CTC head (blank = 0) on the input of `hook_module` (`output_proj`)."""

    def __init__(self, encoder: torch.nn.Module, units: list[str], hook_module: str = "output_proj"):
        super().__init__()
        self.encoder = encoder
        self.units = list(units)
        self.hook_module = hook_module
        hooked = encoder.get_submodule(hook_module)
        self.head = torch.nn.Linear(hooked.in_features, len(self.units) + 1)
        self._captured: list[torch.Tensor] = []
        hooked.register_forward_hook(lambda _m, inputs, _o: self._captured.append(inputs[0]))

    @property
    def index(self) -> dict[str, int]:
        return {unit: i + 1 for i, unit in enumerate(self.units)}

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, 128) log-mel, mask (B, T) -> log-probs (B, T', units + 1), frame lengths (B,)."""
        self._captured.clear()
        output = self.encoder(features, attention_mask=mask)
        hidden = self._captured[0]
        self._captured.clear()
        return self.head(hidden).float().log_softmax(-1), output.attention_mask.sum(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()} | {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        try:
            self.encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}, strict=True)
            self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")}, strict=True)
        except RuntimeError as exc:
            raise RuntimeFailure(f"{source}: does not fit the encoder config ({str(exc).splitlines()[0]})") from exc


def build_model(audio_config: dict, units: list[str], seed: int, hook_module: str = "output_proj") -> CTCEncoder:
    """A fresh `Gemma4AudioModel` (from `audio_config`, a `Gemma4AudioConfig` dict) + head, initialised from `seed`."""
    from transformers import Gemma4AudioConfig, Gemma4AudioModel

    torch.manual_seed(seed)
    try:
        config = Gemma4AudioConfig(**{k: v for k, v in audio_config.items() if k != "model_type"})
    except (TypeError, ValueError) as exc:
        raise UsageError(f"model: not a valid Gemma4AudioConfig ({exc})") from exc
    return CTCEncoder(Gemma4AudioModel(config), units, hook_module)


# ------------------------------------------------------------------------------------------------------ data


def utterance_features(paths: Sequence[str | Path]) -> list[torch.Tensor]:
    """Gemma 4 log-mel features (T, 128) of each audio file, unpadded (valid frames only)."""
    from transformers import Gemma4AudioFeatureExtractor

    extractor = Gemma4AudioFeatureExtractor()
    out = []
    for path in paths:
        audio = load_audio(path)
        features = extractor([audio], sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False)
        valid = int(features["input_features_mask"][0].sum())
        out.append(features["input_features"][0, :valid].float().clone())
    return out


def pad_features(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_i, 128) tensors -> zero-padded (B, T, 128) with T a multiple of PAD_FRAMES, and the (B, T) bool mask."""
    frames = -(-max(len(f) for f in features) // PAD_FRAMES) * PAD_FRAMES
    batch = torch.zeros(len(features), frames, features[0].shape[-1])
    mask = torch.zeros(len(features), frames, dtype=torch.bool)
    for row, f in enumerate(features):
        batch[row, : len(f)] = f
        mask[row, : len(f)] = True
    return batch, mask


def ctc_loss(model: CTCEncoder, features: Sequence[torch.Tensor], targets: Sequence[list[int]], device: torch.device) -> torch.Tensor:
    """Mean CTC loss (per target unit, as torch's 'mean') of one batch."""
    batch, mask = pad_features(features)
    logp, lengths = model(batch.to(device), mask.to(device))
    flat = torch.tensor([u for t in targets for u in t], dtype=torch.long)
    return F.ctc_loss(logp.transpose(0, 1), flat.to(device), lengths, torch.tensor([len(t) for t in targets]).to(device),
                      blank=0, zero_infinity=True)


def decode(model: CTCEncoder, logp: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Greedy CTC: best unit per frame, repeats merged, blanks dropped. Characters are joined as text; phonemes by
    '_' within a word and ' ' between words."""
    chars = all(len(unit) == 1 for unit in model.units)
    out = []
    for row, best in enumerate(logp.argmax(-1).tolist()):
        units, prev = [], 0
        for sym in best[: int(lengths[row])]:
            if sym != prev and sym != 0:
                units.append(model.units[sym - 1])
            prev = sym
        text = "".join(units) if chars else "_".join(units).replace("_ _", " ").strip("_ ")
        out.append(re.sub(r"\s+", " ", text).strip())
    return out


@torch.no_grad()
def evaluate(model: CTCEncoder, features: Sequence[torch.Tensor], references: Sequence[str], targets: Sequence[list[int]],
             device: torch.device, batch_size: int = 16) -> dict:
    """Held-out CTC loss (mean over utterances) and error rate (CER for characters, phoneme error rate for phonemes);
    `references` are the reference texts in the decoder's form, `targets` their unit ids."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i]))
    hypotheses, losses = [""] * len(features), []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch, mask = pad_features([features[i] for i in idx])
        logp, lengths = model(batch.to(device), mask.to(device))
        tgt = [targets[i] for i in idx]
        loss = F.ctc_loss(logp.transpose(0, 1), torch.tensor([u for t in tgt for u in t], dtype=torch.long).to(device), lengths,
                          torch.tensor([len(t) for t in tgt]).to(device), blank=0, zero_infinity=True, reduction="sum")
        losses.append(float(loss) / max(1, sum(len(t) for t in tgt)))
        for i, text in zip(idx, decode(model, logp, lengths)):
            hypotheses[i] = text
    model.train(was_training)
    return {"loss": round(sum(losses) / max(1, len(losses)), 4),
            "error_rate": round(unit_error_rate(model.units, references, hypotheses), 4),
            "examples": [{"reference": references[i], "hypothesis": hypotheses[i]} for i in range(min(3, len(references)))]}


# ------------------------------------------------------------------------------------------------------ folder


def save_encoder_folder(folder: str | Path, model: CTCEncoder, units_kind: str) -> None:
    """Write the standalone `Gemma4AudioModel` folder (config.json, model.safetensors, preprocessor_config.json) and
    the CTC head (ctc_head.safetensors, ctc_head.json). Weights are float32 safetensors; nothing is pickled."""
    from transformers import Gemma4AudioFeatureExtractor

    folder = Path(folder)
    config = model.encoder.config.to_dict()
    config["architectures"] = ["Gemma4AudioModel"]
    write_json(folder / "config.json", config)
    save_tensors(folder / "model.safetensors", {k: v.float() for k, v in model.encoder.state_dict().items()}, metadata=WEIGHTS_METADATA)
    save_tensors(folder / HEAD_FILE, {k: v.float() for k, v in model.head.state_dict().items()}, metadata=WEIGHTS_METADATA)
    write_json(folder / HEAD_CONFIG, {"format": FORMAT, "version": FORMAT_VERSION, "units_kind": units_kind, "units": model.units,
                                      "hook_module": model.hook_module, "blank": 0})
    write_text(folder / "preprocessor_config.json", Gemma4AudioFeatureExtractor().to_json_string())


def load_ctc_encoder(folder: str | Path) -> tuple[CTCEncoder, str]:
    """The encoder + CTC head saved by `save_encoder_folder` (eval mode) and its units kind ('chars' or 'phonemes')."""
    folder = Path(folder)
    meta = read_json(folder / HEAD_CONFIG) if (folder / HEAD_CONFIG).is_file() else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise UsageError(f"{folder}: not a speechless pretrained encoder folder (no {HEAD_CONFIG} of format {FORMAT} v{FORMAT_VERSION})")
    model = build_model(read_json(folder / "config.json"), meta["units"], 0, meta.get("hook_module", "output_proj"))
    tensors = {f"encoder.{k}": v for k, v in load_tensors(folder / "model.safetensors").items()}
    tensors |= {f"head.{k}": v for k, v in load_tensors(folder / HEAD_FILE).items()}
    model.load_tensors(tensors, str(folder))
    return model.eval(), meta["units_kind"]
