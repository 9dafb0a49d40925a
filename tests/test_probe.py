"""The CTC ASR probe (speechless.t2s.probe): text normalisation, CER, training on real tokens, save/load."""

from __future__ import annotations

import pytest
import torch
from test_t2s import make_fake_stage1, one_thread  # noqa: F401  (fixture)

from speechless.core.errors import UsageError
from speechless.core.metrics import cer, probe_text
from speechless.speech.tokens import read_token_jsonl
from speechless.t2s.probe import CTCProbe, ProbeConfig, train_probe


def test_probe_text_and_cer():
    assert probe_text("  Habari, YA\tasubuhi!  ") == "habari ya asubuhi"
    assert probe_text("Ɛyɛ “dɛ”.") == "ɛyɛ dɛ"
    assert cer(["Habari ya asubuhi."], ["habari ya asubuhi"]) == 0.0
    assert cer(["abcd", "ef"], ["abxd", ""]) == pytest.approx(3 / 6)
    with pytest.raises(UsageError, match="empty"):
        cer(["..."], ["x"])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    return make_fake_stage1(tmp_path_factory.mktemp("s1"), sentences=30)


def rows(stage1, split):
    return read_token_jsonl(stage1 / "tokens" / f"{split}.jsonl")


def codes(rs):
    return [torch.tensor(r["codes"]) for r in rs]


def test_probe_learns_to_read_real_tokens_and_round_trips(stage1, tmp_path):
    train = rows(stage1, "train")
    cfg = ProbeConfig(dim=64, conv_layers=1, steps=200, batch_size=8, learning_rate=1e-2)
    probe, summary = train_probe(codes(train), [r["text"] for r in train], cfg, 4, 32)
    assert summary["utterances"] == len(train) and summary["final_loss"] < 2.0
    hyps = probe.transcribe(codes(train))
    assert cer([r["text"] for r in train], hyps) < 0.5  # it reads what it was trained on
    held = rows(stage1, "test")
    assert cer([r["text"] for r in held], probe.transcribe(codes(held))) < 0.8  # and generalises to unseen sentences
    probe.save(tmp_path / "probe", extra={"stage1_revision": held[0]["stage1_revision"]})
    again = CTCProbe.load(tmp_path / "probe")
    assert again.transcribe(codes(held)) == probe.transcribe(codes(held))
    assert probe.transcribe([torch.zeros(4, 0, dtype=torch.long)]) == [""]  # empty utterance: empty transcript


def test_probe_refuses_unusable_data():
    with pytest.raises(UsageError, match="matching, non-empty"):
        train_probe([], [], ProbeConfig(steps=1), 4, 32)
    with pytest.raises(UsageError, match="no characters"):
        train_probe([torch.zeros(4, 5, dtype=torch.long)], ["?!"], ProbeConfig(steps=1), 4, 32)


def test_vectors_probe_reads_decoded_stage1_vectors(stage1, tmp_path):
    """input 'vectors': frozen stage-1 codewords -> linear map; the codebooks are not saved, loading needs them."""
    train = rows(stage1, "train")
    books = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(0))
    cfg = ProbeConfig(input="vectors", dim=64, conv_layers=1, steps=200, batch_size=8, learning_rate=1e-2)
    probe, summary = train_probe(codes(train), [r["text"] for r in train], cfg, 4, 32, codebooks=books)
    assert cer([r["text"] for r in train], probe.transcribe(codes(train))) < 0.5
    assert "books" not in probe.state_dict() and summary["utterances"] == len(train)
    probe.save(tmp_path / "vprobe")
    held = codes(rows(stage1, "test"))
    assert CTCProbe.load(tmp_path / "vprobe", books).transcribe(held) == probe.transcribe(held)
    with pytest.raises(UsageError, match="codebooks"):
        CTCProbe.load(tmp_path / "vprobe")
