"""Stage-2 durations: how long an utterance is (`DurationModel`, from its characters and words, for progress
buckets) and how long each text token is spoken (`DurationPredictor`, learnt from aligned audio, alignment 'ctc')."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speechless.t2s.frames import whole_frames


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

