"""The stage-2 model (speechless.t2s.model and its autoregressive decoder): layout, loss, generation (cache, batching, sampling, caps), text handling, save/load."""

from __future__ import annotations


def make_fake_stage1(folder, *, sentences: int = 30, speakers=("s1", "s2"), levels: int = 4, codebook: int = 32,
                     dim: int = 16, seed: int = 0):
    """A tiny but learnable stage-1 run folder: each character of a sentence becomes a few frames of its own vector
    (speaker-dependent duration) + noise, quantized by a real SpeechRVQ. Returns the folder."""
    import json
    import random
    from pathlib import Path

    import torch

    from speechless.core.io import sha256_file, write_json
    from speechless.speech.rvq import RVQConfig, SpeechRVQ
    from speechless.speech.tokens import token_row, write_token_jsonl

    folder = Path(folder)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    words = ["".join(rng.choice("bdfgkmnpst") + rng.choice("aeiou") for _ in range(rng.randint(1, 3))) for _ in range(40)]
    texts = []
    while len(texts) < sentences:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 4))).capitalize() + "."
        if text not in texts:
            texts.append(text)
    alphabet = sorted({ch for t in texts for ch in t.lower() if ch.isalpha() or ch == " "})
    char_vec = {ch: torch.randn(dim, generator=gen) * 2 for ch in alphabet}
    durations = {spk: 2 + i for i, spk in enumerate(speakers)}
    shifts = {spk: torch.randn(dim, generator=gen) * 0.3 for spk in speakers}
    n_train, n_dev = int(sentences * 0.6), int(sentences * 0.2)
    utts = []
    for s, text in enumerate(texts):
        split = "train" if s < n_train else "dev" if s < n_train + n_dev else "test"
        for spk in speakers:
            chars = [ch for ch in text.lower() if ch in char_vec]
            vecs = torch.stack([char_vec[ch] + shifts[spk] for ch in chars for _ in range(durations[spk])])
            vecs = vecs + 0.3 * torch.randn(vecs.shape, generator=gen)
            utts.append({"id": f"u{s:04d}-{spk}", "text": text, "speaker_id": spk, "split": split, "vectors": vecs})
    rvq = SpeechRVQ(RVQConfig(num_quantizers=levels, codebook_size=codebook, kmeans_iters=4, kmeans_sample=20000), dim)
    rvq.initialize(torch.cat([u["vectors"] for u in utts if u["split"] == "train"]), seed=seed)
    rvq.save(folder)
    revision = sha256_file(folder / "model.safetensors")
    for split in ("train", "dev", "test"):
        rows = []
        for u in utts:
            if u["split"] == split:
                codes = rvq.encode(u["vectors"])
                rows.append(token_row(u["id"], u["text"], codes, [[0.0, len(codes) / 25, len(codes)]], codebook, revision))
        write_token_jsonl(folder / "tokens" / f"{split}.jsonl", rows)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({k: v for k, v in u.items() if k != "vectors"}) + "\n" for u in utts))
    write_json(folder / "provenance.json", {"stage": "stage1", "manifest": {"path": str(manifest)}})
    return folder


import json
import math

import pytest
import torch

from speechless.core.errors import UsageError
from speechless.t2s.autoregressive import guided_logits
from speechless.t2s.config import T2SConfig
from speechless.t2s.frames import collate, constant_rate_index, delayed_tokens, delays_for
from speechless.t2s.model import T2SModel, build_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread hand-off costs (10x faster on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_BACKBONE = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 1024,
                 "tie_word_embeddings": True}
TEXTS = ["habari ya asubuhi", "watoto walichora picha darasani juzi", "ninapenda chai sana", "Mvua inanyesha leo."]


def tiny_model(tmp_path, frame_mode="delay", levels=4, codebook=16, speakers=("a", "b"), **extra) -> T2SModel:
    path = tmp_path / "backbone.json"
    path.write_text(json.dumps(TINY_BACKBONE))
    extra = {"dropout": 0.0, "max_text_tokens": 192, **extra}  # the sizes these tests were written for (not the real-scale defaults)
    cfg = T2SConfig(backbone=str(path), frame_mode=frame_mode, head_rank=8, tokenizer_vocab_size=40, **extra)
    frames = [len(t) // 2 for t in TEXTS]  # the duration model's training data (used with progress buckets)
    return build_model(cfg, TEXTS, levels, codebook, list(speakers), {"revision": "r" * 64, "ref": "fake"}, seed=0,
                       train_frames=frames, train_speakers=[speakers[i % len(speakers)] for i in range(len(TEXTS))])


@pytest.mark.parametrize("mode, delays", [("delay", [0, 1, 2]), ("parallel", [0, 0, 0]), ("coarse_first", [0, 1, 1])])
def test_delay_pattern_layout(mode, delays):
    assert delays_for(mode, 3) == delays
    codes = torch.arange(12).view(3, 4) % 10  # (Q=3, T=4), codebook 10: EOA 10, PAD 11, BOA 12
    inputs, targets = delayed_tokens(codes, delays, 10)
    steps = 4 + max(delays) + 1
    assert inputs.shape == targets.shape == (steps, 3)
    for level, d in enumerate(delays):
        assert targets[d:d + 4, level].tolist() == codes[level].tolist()  # frame t of level k at step t + d_k
        assert targets[d + 4, level] == 10  # then EOA
        assert (targets[:d, level] == -100).all() and (targets[d + 5:, level] == -100).all()
        assert (inputs[: d + 1, level] == 12).all()  # BOA until the level's first frame is fed back
        assert inputs[1:, level].tolist()[d:d + 4] == codes[level].tolist()  # teacher forcing: input = previous target
    # a frame's level k is emitted after level k-1 of the same frame under the delay pattern only
    assert (max(delays) > 0) == (mode != "parallel")


def test_loss_is_per_level_and_decreases_when_overfitting(tmp_path):
    model = tiny_model(tmp_path)
    gen = torch.Generator().manual_seed(0)
    items = [(model.text.encode(t).chunks[0], torch.randint(0, 16, (4, 6 + i), generator=gen), i % 2) for i, t in enumerate(TEXTS)]
    batch = collate(items, model.delays, model.codebook_size)
    first = model.loss(batch)
    assert first["level_loss"].shape == (4,) and abs(float(first["loss"].detach()) - math.log(17)) < 0.5
    # every level has one target per frame plus its EOA
    assert first["level_count"].tolist() == [float(sum(6 + i + 1 for i in range(4)))] * 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(model.loss(batch)["loss"].detach()) < 0.5 * float(first["loss"].detach())


@pytest.mark.parametrize("mode, progress, window", [
    ("delay", 0, 0), ("parallel", 0, 0), ("coarse_first", 0, 0), ("delay", 8, 0), ("delay", 8, 2)])
def test_kv_cache_and_batching_do_not_change_greedy_output(tmp_path, mode, progress, window):
    model = tiny_model(tmp_path, frame_mode=mode, progress_buckets=progress, text_window=window)
    ids = [model.text.encode(t).chunks[0] for t in TEXTS]
    cached, capped = model.generate(ids, [0, 1, 0, 1], max_frames=12)
    uncached, _ = model.generate(ids, [0, 1, 0, 1], max_frames=12, use_cache=False)
    single = [model.generate([i], [s], max_frames=12)[0][0] for i, s in zip(ids, [0, 1, 0, 1])]
    for a, b, c in zip(cached, uncached, single):
        assert a.shape[0] == 4 and 1 <= a.shape[1] <= 12
        assert torch.equal(a, b) and torch.equal(a, c)
    assert len(capped) == 4


def test_sampling_is_seeded_and_top_k_1_is_greedy(tmp_path):
    model = tiny_model(tmp_path)
    ids = [model.text.encode(t).chunks[0] for t in TEXTS[:2]]
    greedy, _ = model.generate(ids, max_frames=10)
    top1, _ = model.generate(ids, max_frames=10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(greedy, top1))
    s1, _ = model.generate(ids, max_frames=10, temperature=1.5, generator=torch.Generator().manual_seed(1))
    s2, _ = model.generate(ids, max_frames=10, temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))


def test_model_stops_at_end_of_audio_and_is_capped_otherwise(tmp_path):
    model = tiny_model(tmp_path)
    ids = [model.text.encode(TEXTS[0]).chunks[0]]
    with torch.no_grad():
        model.head_bias[0, model.eoa] = 1e4  # level 0 says EOA as soon as allowed (after min_frames)
    codes, capped = model.generate(ids, max_frames=50, min_frames=3)
    assert codes[0].shape == (4, 3) and capped == [False]
    assert int(codes[0].max()) < model.codebook_size  # only real codes come out, never EOA/PAD/BOA
    with torch.no_grad():
        model.head_bias[0, model.eoa] = -1e4  # never ends: the cap cuts it
    codes, capped = model.generate(ids, max_frames=7)
    assert codes[0].shape == (4, 7) and capped == [True]


def test_text_checks(tmp_path):
    model = tiny_model(tmp_path, max_text_tokens=8)
    with pytest.raises(UsageError, match="empty text"):
        model.text.encode("   \n ")
    with pytest.raises(UsageError, match="never saw"):
        model.text.encode("ɛɔ ŋ")
    enc = model.text.encode("habari ɛ yako")
    assert enc.notes and "'ɛ'" in enc.notes[0] and "U+025B" in enc.notes[0]
    assert enc.chunks == model.text.encode("habari yako").chunks  # the unseen character is dropped
    long = " ".join(["watoto walichora picha"] * 10)
    enc = model.text.encode(long)
    assert len(enc.chunks) > 1 and all(1 <= len(c) <= 8 for c in enc.chunks)
    assert "split at word boundaries" in enc.notes[-1]
    decoded = " ".join(model.text.tokenizer.decode(c) for c in enc.chunks)
    assert decoded.split() == long.split()  # nothing lost, nothing reordered


def test_unknown_speaker_is_refused(tmp_path):
    model = tiny_model(tmp_path)
    assert model.speaker_index(None) == 0 and model.speaker_index("b") == 1
    with pytest.raises(UsageError, match="unknown; this model knows a, b"):
        model.speaker_index("zz")


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(tmp_path, frame_mode="coarse_first")
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = T2SModel.load(tmp_path / "ckpt")
    assert loaded.delays == [0, 1, 1, 1] and loaded.speakers == ["a", "b"] and loaded.stage1["revision"] == "r" * 64
    ids = [model.text.encode(t).chunks[0] for t in TEXTS]
    assert [loaded.text.encode(t).chunks[0] for t in TEXTS] == ids
    a, _ = model.generate(ids, max_frames=8)
    b, _ = loaded.generate(ids, max_frames=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    (tmp_path / "ckpt" / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(UsageError, match="not a speechless stage-2"):
        T2SModel.load(tmp_path / "ckpt")


def test_duration_model_fits_per_speaker_and_falls_back_to_everyone():
    from speechless.t2s.duration import DurationModel, text_features

    texts = [" ".join("ab" * (1 + (i * j) % 3) for j in range(1 + i % 4)) for i in range(40)]
    speakers = ["slow" if i % 2 else "fast" for i in range(40)]
    truth = {"fast": (2.0, 3.0, 5.0), "slow": (4.0, 1.0, 9.0)}
    frames = [round(sum(w * f for w, f in zip(truth[s], text_features(t)))) for t, s in zip(texts, speakers)]
    model = DurationModel.fit(texts, frames, speakers)
    for name, coef in truth.items():
        assert model.coef[name] == pytest.approx(coef, abs=1e-3)
    assert model.predict("abab ab", "slow") == 4 * 6 + 2 + 9 and model.predict("abab ab", "fast") == 2 * 6 + 6 + 5
    # an unknown voice gets the fit over everyone: between the two
    assert 2 * 6 + 6 + 5 < model.predict("abab ab", "other") < 4 * 6 + 2 + 9
    few = DurationModel.fit(texts[:5], frames[:5], speakers[:5])  # too few per speaker: only the joint fit
    assert set(few.coef) == {""}


def test_progress_buckets_reach_the_last_exactly_at_the_end():
    from speechless.t2s.frames import progress_buckets

    steps = torch.arange(12).expand(2, -1)
    buckets = progress_buckets(steps, torch.tensor([10, 4]), 8)
    assert buckets[0].tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 7, 7]  # floor(s * 7 / 10); 7 from step 10 on
    assert buckets[1].tolist() == [0, 1, 3, 5, 7, 7, 7, 7, 7, 7, 7, 7]
    assert bool((buckets[:, :-1] <= buckets[:, 1:]).all())


def test_constant_rate_index_walks_the_text_at_a_constant_rate_with_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # 4 and 6 text tokens, left-padded
    index = constant_rate_index(mask, torch.arange(10).expand(2, -1), torch.tensor([8, 3]))
    assert index[0].tolist() == [2, 2, 3, 3, 4, 4, 5, 5, 5, 5]  # floor(s * 4 / 8) after 2 pads; the last token from step 8
    assert index[1].tolist() == [0, 2, 4, 5, 5, 5, 5, 5, 5, 5]


def test_text_window_reads_the_aligned_text_and_needs_progress(tmp_path):
    model = tiny_model(tmp_path, progress_buckets=8, text_window=1)
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    steps, frames = torch.arange(6).expand(2, -1), torch.tensor([6, 6])
    index = constant_rate_index(mask, steps, frames)
    window = model._text_window(ids, mask, index)
    other = ids.clone()
    other[0, 3] = 12  # the last token of row 0: read only by the steps whose window reaches it (aligned index >= 2)
    changed = (model._text_window(other, mask, index) - window).abs().sum(-1) > 0
    assert changed[0].tolist() == [False, False, True, True, True, True] and not bool(changed[1].any())
    with pytest.raises(UsageError, match="progress_buckets"):
        tiny_model(tmp_path, text_window=1)


def test_code_dropout_acts_in_training_only(tmp_path):
    model = tiny_model(tmp_path, code_dropout=0.5)
    tokens = torch.randint(0, 16, (2, 7, 4))
    args = (tokens, torch.tensor([0, 1]), torch.arange(7).expand(2, -1), torch.tensor([7, 7]),
            torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    model.eval()
    full = model._audio_embeds(*args)
    model.train()
    torch.manual_seed(0)
    dropped = model._audio_embeds(*args)
    model.eval()
    assert torch.equal(model._audio_embeds(*args), full)
    # each step keeps a subset of its level embeddings: what is missing is a sum of some of them
    level = model.level_embed(tokens + model.level_offsets).detach()  # (B, S, Q, H)
    missing = (full - dropped).detach()
    subsets = torch.tensor([[(k >> q) & 1 for q in range(4)] for k in range(16)], dtype=level.dtype)  # all 16 subsets
    candidates = torch.einsum("kq,bsqh->bskh", subsets, level)
    error = (candidates - missing[:, :, None]).abs().amax(-1).amin(-1)
    assert bool((error < 1e-5).all()) and float(missing.abs().sum()) > 0


def test_progress_model_counts_against_the_given_length_and_round_trips_save_load(tmp_path):
    model = tiny_model(tmp_path, progress_buckets=8)
    ids = [model.text.encode(t).chunks[0] for t in TEXTS]
    predicted = [model.predict_frames(i, s) for i, s in zip(ids, [0, 1, 0, 1])]
    assert all(p >= 1 for p in predicted)
    g = lambda **kw: model.generate(ids, [0, 1, 0, 1], max_frames=30, **kw)[0]
    default, explicit = g(), g(target_frames=predicted)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit))  # None = the duration model's lengths
    other = g(target_frames=[p + 7 for p in predicted])  # another length: other progress embeddings, other codes
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(default, other))
    model.save(tmp_path / "ckpt")
    loaded = T2SModel.load(tmp_path / "ckpt")
    assert loaded.duration.coef == model.duration.coef
    assert all(torch.equal(a, b) for a, b in zip(default, loaded.generate(ids, [0, 1, 0, 1], max_frames=30)[0]))
    with pytest.raises(UsageError, match="duration model"):
        build_model(model.cfg, TEXTS, 4, 16, ["a", "b"], {"revision": "r" * 64, "ref": "fake"})  # no frames to fit on


def test_unconditional_training_rows_do_not_see_their_text(tmp_path):
    model = tiny_model(tmp_path, progress_buckets=8, text_window=2, unconditional_prob=0.999)
    gen = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, 16, (4, 6 + i), generator=gen) for i in range(2)]

    def loss(texts, train):
        model.train(train)
        torch.manual_seed(1)  # the same rows are drawn unconditional in both calls
        items = [(model.text.encode(t).chunks[0], c, i) for i, (t, c) in enumerate(zip(texts, codes))]
        return float(model.loss(collate(items, model.delays, model.codebook_size))["loss"].detach())

    with_text, other_text = loss(TEXTS[:2], True), loss(TEXTS[2:], True)
    assert math.isfinite(with_text) and with_text == other_text  # text masked out and window empty: the text plays no part
    assert loss(TEXTS[:2], False) != loss(TEXTS[2:], False)  # in eval the text always counts
    model.eval()


def test_guidance_changes_what_is_said_not_when_it_ends():
    torch.manual_seed(0)
    cond, uncond = torch.randn(3, 2, 7) * 3, torch.randn(3, 2, 7) * 3
    cond[0, 0, 6], uncond[0, 0, 6] = 1.0, -3.0  # a row the text model may end, more than the text-free one would
    guided = guided_logits(cond, uncond, 3.0, eoa=6)
    assert torch.allclose(guided[..., :6], uncond[..., :6] + 3.0 * (cond[..., :6] - uncond[..., :6]))
    assert torch.allclose(guided[:, 0].softmax(-1)[:, 6], cond[:, 0].softmax(-1)[:, 6], atol=1e-6)  # the text model's end odds
    assert torch.allclose(guided[:, 1], uncond[:, 1] + 3.0 * (cond[:, 1] - uncond[:, 1]))  # only level 0 ends
    plain = uncond + 3.0 * (cond - uncond)
    assert plain[0, 0].softmax(-1)[6] > cond[0, 0].softmax(-1)[6] + 0.01  # what plain guidance would have done


def test_guidance_zero_is_text_free_and_guided_generation_batches_like_single_rows(tmp_path):
    model = tiny_model(tmp_path, progress_buckets=8, text_window=2, unconditional_prob=0.2)
    with torch.no_grad():  # a random model barely reads the text; make text embeddings matter
        model.lm.get_input_embeddings().weight.mul_(50)
    ids = [model.text.encode(t).chunks[0] for t in TEXTS]
    frames = [9, 9, 9, 9]
    text_free, _ = model.generate(ids, [0, 0, 0, 0], max_frames=12, target_frames=frames, guidance=0.0)
    shortest = min(c.shape[1] for c in text_free)  # the end odds are still the text model's, so lengths may differ
    assert all(torch.equal(text_free[0][0, :shortest], c[0, :shortest]) for c in text_free[1:])  # u alone picks the codes
    plain, _ = model.generate(ids, [0, 0, 0, 0], max_frames=12, target_frames=frames)
    assert any(not torch.equal(plain[0], c) for c in plain[1:])
    guided, capped = model.generate(ids, [0, 1, 0, 1], max_frames=12, target_frames=frames, guidance=3.0)
    uncached, _ = model.generate(ids, [0, 1, 0, 1], max_frames=12, target_frames=frames, guidance=3.0, use_cache=False)
    single = [model.generate([i], [s], max_frames=12, target_frames=[9], guidance=3.0)[0][0] for i, s in zip(ids, [0, 1, 0, 1])]
    assert len(capped) == 4 and all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(guided, uncached, single))
    assert any(not torch.equal(a, b) for a, b in zip(guided, model.generate(ids, [0, 1, 0, 1], max_frames=12, target_frames=frames)[0]))
    with pytest.raises(UsageError, match="unconditional_prob"):
        tiny_model(tmp_path).generate(ids[:1], max_frames=5, guidance=2.0)


def test_backbone_layers_keeps_the_first_decoder_layers_of_a_pretrained_backbone(tmp_path):
    """A folder backbone cut to its first layers: config updated (a saved checkpoint rebuilds that shape), the kept
    layers are the original ones; more layers than it has, or a config backbone, are refused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from speechless.t2s.backbone import load_backbone
    from speechless.t2s.config import T2SConfig

    data = json.loads(open("configs/llm/tiny_gemma3.json").read())
    data.pop("_comment")
    full = AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data))
    full.save_pretrained(tmp_path / "lm")
    cut, record = load_backbone(T2SConfig(backbone=str(tmp_path / "lm"), backbone_layers=1), None)
    assert len(cut.base_model.layers) == 1 and cut.config.num_hidden_layers == 1 and cut.config.layer_types == ["sliding_attention"]
    assert record["layers"] == 1
    assert torch.equal(cut.base_model.layers[0].mlp.up_proj.weight, full.base_model.layers[0].mlp.up_proj.weight)
    assert cut.base_model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state.shape == (1, 3, 64)
    with pytest.raises(UsageError, match="backbone_layers=3: the backbone has 2 decoder layers"):
        load_backbone(T2SConfig(backbone=str(tmp_path / "lm"), backbone_layers=3), None)
    with pytest.raises(UsageError, match="sets its layers itself"):
        load_backbone(T2SConfig(backbone="configs/t2s/tiny_backbone.json", backbone_layers=1), 96)


def test_frozen_text_embeddings_are_left_out_of_the_optimizer(tmp_path):
    from speechless.core.training import adamw

    frozen, trained = tiny_model(tmp_path, freeze_text_embeddings=True), tiny_model(tmp_path)
    embedding = frozen.lm.get_input_embeddings().weight
    assert not embedding.requires_grad and trained.lm.get_input_embeddings().weight.requires_grad
    in_optimizer = {id(p) for group in adamw(frozen, 1e-3, 0.01).param_groups for p in group["params"]}
    assert id(embedding) not in in_optimizer and id(frozen.level_embed.weight) in in_optimizer
