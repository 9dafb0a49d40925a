"""Fast tests of speechless.speech.rvq and speechless.core.metrics on tiny quantizers (dim 16, 4 levels x 32 codes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from speechless.core.errors import UsageError
from speechless.core.metrics import quantizer_metrics
from speechless.speech.rvq import RVQConfig, SpeechRVQ, average_checkpoints, kmeans

DIM, LEVELS, CODES = 16, 4, 32


def _data(n: int, seed: int = 0) -> torch.Tensor:
    """Clustered data with a large common mean, like encoder activations."""
    centres = torch.randn(12, DIM, generator=torch.Generator().manual_seed(1234)) * 2
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, 12, (n,), generator=gen)
    return 5.0 + centres[pick] + 0.5 * torch.randn(n, DIM, generator=gen)


def _cfg(**kw) -> RVQConfig:
    base = dict(num_quantizers=LEVELS, codebook_size=CODES, kmeans_iters=8, encode_chunk=64)
    base.update(kw)
    return RVQConfig(**base)


@pytest.fixture(scope="module")
def fitted() -> tuple[SpeechRVQ, torch.Tensor]:
    train = _data(3000)
    model = SpeechRVQ(_cfg(), DIM)
    model.initialize(train, seed=0)
    return model.eval(), train


def test_init_uses_every_code_on_train(fitted):
    model, train = fitted
    codes = model.encode(train)
    for level in range(LEVELS):
        assert torch.unique(codes[:, level]).numel() == CODES


def test_equal_norm_levels(fitted):
    model, _ = fitted
    norms = model.codebooks().norm(dim=-1)
    assert model.cfg.equal_norm_from_level == 1 and not model.cfg.null_code
    assert float(norms[0].std()) > 1e-3  # level 0: plain k-means
    for level in range(1, LEVELS):
        assert torch.allclose(norms[level], norms[level].mean().expand_as(norms[level]), rtol=1e-4)
    with_null = SpeechRVQ(_cfg(null_code=True), DIM)
    with_null.initialize(_with_silence(3000, 600, seed=0), seed=0)
    norms = with_null.codebooks().norm(dim=-1)
    for level in range(1, LEVELS):
        directions, null = norms[level, :-1], norms[level, -1]
        assert torch.allclose(directions, directions.mean().expand_as(directions), rtol=1e-4)
        assert float(null) < 0.5 * float(directions[0])  # the last code is the null code


def _with_silence(n: int, silent: int, seed: int) -> torch.Tensor:
    """Clustered rows plus `silent` near-identical rows (like silence frames: level 0 codes them almost exactly)."""
    gen = torch.Generator().manual_seed(seed + 99)
    silence = 5.0 + 0.01 * torch.randn(silent, DIM, generator=gen)
    return torch.cat([_data(n, seed), silence])


def test_null_code_serves_what_level_0_already_coded():
    train = _with_silence(3000, 600, seed=0)
    held = _with_silence(1000, 200, seed=1)
    silent = torch.arange(len(held)) >= 1000
    codes = {}
    for null_code in (True, False):
        model = SpeechRVQ(_cfg(null_code=null_code), DIM)
        model.initialize(train, seed=0)
        codes[null_code] = model.eval().encode(held)
    # with the null code, near-zero residuals go to it at every gain-shape level ...
    assert bool((codes[True][silent, 1:] == CODES - 1).all())
    # ... without it they are spread over arbitrary directions
    assert all(torch.unique(codes[False][silent, level]).numel() > 1 for level in range(1, LEVELS))


def test_null_code_survives_ema_training():
    """EMA fine-tuning keeps the null code near zero and serving the near-zero residuals; every code stays in use."""
    train = _with_silence(3000, 1500, seed=0)
    held = _with_silence(1500, 750, seed=1)
    silent = torch.arange(len(held)) >= 1500
    model = SpeechRVQ(_cfg(null_code=True), DIM)
    model.initialize(train, seed=0)
    gain = float(model.codebooks()[1, 0].norm())
    for step in range(20):
        torch.manual_seed(step)
        model.train_step(train[torch.randint(len(train), (512,))])
    codes = model.eval().encode(held)
    assert float(model.codebooks()[1, -1].norm()) < 0.1 * gain
    assert float((codes[silent, 1:] == CODES - 1).float().mean()) > 0.99
    for level in range(1, LEVELS):
        assert torch.unique(codes[:, level]).numel() == CODES


def test_frozen_codebooks_do_not_change(fitted):
    model, train = fitted
    m = SpeechRVQ(_cfg(finetune=False), DIM)
    m.load_tensors(model.tensors())
    before = m.codebooks().clone()
    m.train_step(train[:256])
    assert torch.equal(m.codebooks(), before)


def test_kmeans_reseeds_empty_clusters_with_duplicates():
    # many exact duplicates (like silence frames) would leave clusters empty without re-seeding
    x = torch.cat([torch.zeros(500, 4), torch.randn(100, 4)])
    centroids, counts = kmeans(x, 40, iters=5, generator=torch.Generator().manual_seed(0))
    assert int(counts.min()) >= 1 and int(counts.sum()) == 600


def test_initialize_is_deterministic(fitted):
    model, train = fitted
    other = SpeechRVQ(_cfg(), DIM)
    other.initialize(train, seed=0)
    for name, value in model.tensors().items():
        assert torch.equal(value, other.tensors()[name]), name


def test_encode_matches_residualvq(fitted):
    model, _ = fitted
    x = _data(2000, seed=1)
    with torch.no_grad():
        _, ref, _ = model.rvq(model.standardize(x).unsqueeze(0))
    assert torch.equal(model.encode(x), ref[0])


def test_encode_is_batch_invariant(fitted):
    model, _ = fitted
    x = _data(200, seed=2)  # > 3 chunks of 64 rows, the last one padded
    together = model.encode(x)
    alone = torch.cat([model.encode(x[i:i + 1]) for i in range(x.shape[0])])
    assert torch.equal(together, alone)
    assert torch.equal(model.encode(x[37:150]), together[37:150])


def test_decode_error_decreases_over_levels(fitted):
    model, _ = fitted
    x = _data(1000, seed=3)
    codes = model.encode(x)
    errors = [float(((model.decode(codes[:, :q]) - x) ** 2).mean()) for q in range(1, LEVELS + 1)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * float(((x - x.mean(0)) ** 2).mean())


def test_save_load_round_trip(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path / "rvq")
    meta = json.loads((tmp_path / "rvq" / "config.json").read_text())
    assert meta["rvq_dim"] == DIM and meta["num_quantizers"] == LEVELS and meta["codebook_size"] == CODES
    loaded = SpeechRVQ.load(tmp_path / "rvq", expected_dim=DIM)
    x = _data(500, seed=4)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    model.save(tmp_path / "rvq", weights="best.safetensors")
    assert torch.equal(SpeechRVQ.load(tmp_path / "rvq", weights="best.safetensors").encode(x), model.encode(x))


def test_load_with_other_dim_is_usage_error(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path / "rvq")
    with pytest.raises(UsageError, match=f"has dim {DIM}, encoder gives 1024"):
        SpeechRVQ.load(tmp_path / "rvq", expected_dim=1024)
    with pytest.raises(UsageError):
        SpeechRVQ(_cfg(dim=8), DIM)


def test_kmeans_not_rerun_after_load(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path / "rvq")
    loaded = SpeechRVQ.load(tmp_path / "rvq")
    before = loaded.codebooks().clone()
    assert loaded.is_initialized()
    with torch.no_grad():
        loaded.rvq(torch.randn(1, 300, DIM))  # an uninitialised vqp codebook would run k-means here, even in eval()
    assert torch.equal(loaded.codebooks(), before)


def test_training_step_ema_and_dead_code(fitted):
    model, train = fitted
    m = SpeechRVQ(_cfg(dead_code_threshold=0.5), DIM)
    m.load_tensors(model.tensors())
    before = m.codebooks().clone()
    out = m.train_step(train[:256])
    assert set(out) == {"loss", "mse", "cosine", "commitment"} and all(math.isfinite(v) for v in out.values())
    assert not torch.equal(m.codebooks(), before)  # EMA update ran inside the forward
    cb = m.rvq.layers[0]._codebook
    assert cb.threshold_ema_dead_code == pytest.approx(0.5 * 256 / CODES)
    assert float(cb.cluster_size.sum()) == pytest.approx(256, rel=0.1)  # shares -> hits per batch (+ re-seeded codes)
    assert all(not p.requires_grad for p in m.parameters())  # EMA codebooks: nothing for an optimizer


def test_average_checkpoints(fitted):
    model, train = fitted
    other = SpeechRVQ(_cfg(), DIM)
    other.load_tensors(model.tensors())
    other.train_step(train[:512])
    avg = average_checkpoints([model, other])
    expected = (model.codebooks() + other.codebooks()) / 2
    assert torch.allclose(avg.codebooks(), expected, atol=1e-6)
    assert torch.equal(average_checkpoints([model]).codebooks(), model.codebooks())


def test_metrics_hand_made_case():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 0.0]])
    codes = torch.tensor([[0, 3], [0, 3], [1, 3], [2, 3]])
    m = quantizer_metrics(x, x_hat, codes, codebook_size=4, chunk=3)
    assert m["mse"] == pytest.approx((1.0 + 4.0) / 8)
    mu = x.mean(0)
    variance = float(((x - mu) ** 2).mean())
    assert m["nmse"] == pytest.approx(m["mse"] / variance)
    assert m["cosine"] == pytest.approx((1 + 1 + 1 - 1) / 4)
    ccos = torch.nn.functional.cosine_similarity(x - mu, x_hat - mu, dim=1).mean()
    assert m["centered_cosine"] == pytest.approx(float(ccos), abs=1e-6)
    assert m["utilization"] == [0.75, 0.25]
    # level 0 usage (2, 1, 1, 0)/4: entropy = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 -> perplexity 2^1.5; level 1: 1
    assert m["perplexity"][0] == pytest.approx(2 ** 1.5)
    assert m["perplexity"][1] == pytest.approx(1.0)
    assert m["num_vectors"] == 4
    with pytest.raises(UsageError):
        quantizer_metrics(x, x_hat, torch.tensor([[0], [1], [2], [4]]), codebook_size=4)
