"""Text-to-frame alignment (speechless.t2s.align) and the stage-2 model's aligned mode (model.alignment: ctc)."""

import itertools
import json

import pytest
import torch
from test_t2s import TEXTS, TINY_BACKBONE, one_thread  # noqa: F401  (fixture)

from speechless.core.errors import UsageError
from speechless.core.metrics import probe_text
from speechless.t2s.align import ctc_viterbi, probe_char_map, proportional_durations, token_durations
from speechless.t2s.config import T2SConfig
from speechless.t2s.duration import frames_from_log
from speechless.t2s.frames import collate, frame_token_index, scale_durations
from speechless.t2s.model import T2SModel, build_model
from speechless.t2s.parallel import ParallelT2S


def collapse(path: tuple[int, ...]) -> list[int]:
    out, prev = [], 0
    for sym in path:
        if sym != prev and sym != 0:
            out.append(sym)
        prev = sym
    return out


@pytest.mark.parametrize("seed, targets, slots", [(0, [1, 2], 5), (1, [2, 2], 5), (2, [1, 3, 1], 6), (3, [3], 4), (4, [1, 1, 2], 6)])
def test_viterbi_finds_the_best_path_of_the_transcript(seed, targets, slots):
    log_probs = torch.randn(slots, 4, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
    best, best_score = None, -float("inf")
    for path in itertools.product(range(4), repeat=slots):  # every path that spells the transcript
        if collapse(path) == targets:
            score = float(sum(log_probs[t, s] for t, s in enumerate(path)))
            if score > best_score:
                best, best_score = path, score
    firsts, prev = [], 0
    for t, sym in enumerate(best):
        if sym != 0 and sym != prev:
            firsts.append(t)
        prev = sym
    assert ctc_viterbi(log_probs, targets) == firsts


def test_viterbi_refuses_a_transcript_longer_than_the_slots():
    log_probs = torch.randn(3, 4).log_softmax(-1)
    assert ctc_viterbi(log_probs, [1, 1, 2]) is None  # a repeat needs a blank between: 4 slots at least
    assert ctc_viterbi(log_probs, [1, 2, 3]) is not None


@pytest.mark.parametrize("text", ["Mama anasoma barua.", "Habari, ya  asubuhi?", " Ğa ĞB ", "a-b c"])
def test_char_map_gives_the_judge_form_and_where_each_character_went(text):
    form, index = probe_char_map(text)
    assert form == probe_text(text)
    assert len(index) == len(text)
    for ch, i in zip(text, index):
        if i is not None:
            assert form[i] == (ch.lower() if ch.isalnum() else " ")


def test_token_durations_cover_the_frames_in_order():
    text = "mama anasoma barua"
    form, char_map = probe_char_map(text)
    offsets = [(0, 4), (4, 12), (12, 18)]
    char_frames = [2, 2, 3, 4, 6, 7, 7, 8, 9, 9, 10, 11, 13, 14, 14, 15, 16, 17]  # frame of each judge character
    assert token_durations(offsets, char_map, char_frames, 25) == [6, 7, 12]  # starts 0 (leading silence), 6, 13
    # a token with no aligned character (punctuation) lasts 0 frames; the sum is always the utterance's frames
    text = "mama, leo"
    form, char_map = probe_char_map(text)
    durations = token_durations([(0, 4), (4, 5), (5, 9)], char_map, [1, 2, 3, 4, 5, 6, 7, 8], 12)
    assert durations == [5, 1, 6]  # "," is the judge's space (frame 5): it is aligned; " leo" starts at "l" (frame 6)
    assert token_durations([(0, 4), (4, 5)], [0, 1, 2, 3, None], [0, 1, 2, 3], 9) == [9, 0]
    assert proportional_durations(3, 10) == [3, 3, 4]


def test_frame_token_index_and_rounding():
    durations = torch.tensor([[0, 0, 2, 0, 3], [1, 1, 1, 1, 1]])  # left-padded rows: 3 and 5 tokens
    assert frame_token_index(durations, 7).tolist() == [[2, 2, 4, 4, 4, 4, 4], [0, 1, 2, 3, 4, 4, 4]]
    log_d = torch.log1p(torch.tensor([[0.4, 0.4, 0.4, 0.4], [2.0, 3.0, 0.0, 1.0]]))
    frames = frames_from_log(log_d, torch.ones(2, 4, dtype=torch.long))
    assert frames.tolist() == [[0, 1, 0, 1], [2, 3, 0, 1]]  # 4 x 0.4 = 1.6 -> 2 frames in all, not 0
    scaled = scale_durations(torch.tensor([[1, 2, 3]]), torch.tensor([12]))
    assert scaled.tolist() == [[2, 4, 6]]


def aligned_model(tmp_path, **extra) -> T2SModel:
    path = tmp_path / "backbone.json"
    path.write_text(json.dumps(TINY_BACKBONE))
    extra = {"text_window": 1, **extra}
    cfg = T2SConfig(backbone=str(path), head_rank=8, tokenizer_vocab_size=40, dropout=0.0, max_text_tokens=192,
                    alignment="ctc", **extra)
    return build_model(cfg, TEXTS, 4, 16, ["a", "b"], {"revision": "r" * 64, "ref": "fake"}, seed=0)


def items_of(model: T2SModel, per_token: int = 2) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    items = []
    for i, text in enumerate(TEXTS):
        ids = model.text.encode(text).chunks[0]
        durations = [per_token + (k % 2) for k in range(len(ids))]
        items.append((ids, torch.randint(0, 16, (4, sum(durations)), generator=gen), i % 2, durations))
    return items


def overfit(model: T2SModel, batch, steps: int = 60) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_ctc_alignment_needs_a_text_window(tmp_path):
    with pytest.raises(UsageError, match="text_window"):
        aligned_model(tmp_path, text_window=0)
    model = aligned_model(tmp_path)
    with pytest.raises(UsageError, match="durations"):  # training items without durations
        model.loss(collate([(i[0], i[1], i[2]) for i in items_of(model)], model.delays, model.codebook_size))


def test_each_step_reads_the_token_aligned_there(tmp_path):
    model = aligned_model(tmp_path)
    items = items_of(model)
    batch = collate(items, model.delays, model.codebook_size)
    row = 1
    ids, _, _, durations = items[row]
    lt = batch.text_ids.shape[1]
    expected = [lt - len(ids) + k for k, d in enumerate(durations) for _ in range(d)]
    assert batch.frame_tokens[row, : len(expected)].tolist() == expected
    assert (batch.frame_tokens[row, len(expected):] == lt - 1).all()
    with pytest.raises(UsageError, match="durations"):
        collate([(ids, items[row][1], 0, durations[:-1])], model.delays, model.codebook_size)


def test_generation_speaks_the_predicted_durations_with_and_without_cache(tmp_path):
    model = aligned_model(tmp_path)
    ids = [model.text.encode(t).chunks[0] for t in TEXTS]
    tids = torch.zeros(4, max(map(len, ids)), dtype=torch.long)
    mask = torch.zeros_like(tids)
    for r, i in enumerate(ids):
        tids[r, tids.shape[1] - len(i):] = torch.tensor(i)
        mask[r, tids.shape[1] - len(i):] = 1
    predicted = model.predict_durations(tids, mask, torch.tensor([0, 1, 0, 1])).sum(-1).clamp_min(1).tolist()
    cached, capped = model.generate(ids, [0, 1, 0, 1], max_frames=200)
    uncached, _ = model.generate(ids, [0, 1, 0, 1], max_frames=200, use_cache=False)
    assert [c.shape[1] for c in cached] == predicted and capped == [False] * 4
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
    forced, _ = model.generate(ids, [0, 1, 0, 1], max_frames=200, target_frames=[5, 9, 3, 7])
    assert [c.shape[1] for c in forced] == [5, 9, 3, 7]
    short, capped = model.generate(ids, [0, 1, 0, 1], max_frames=2, target_frames=[5, 9, 3, 7])
    assert [c.shape[1] for c in short] == [2] * 4 and capped == [True] * 4


def test_duration_predictor_learns_and_round_trips_save_load(tmp_path):
    model = aligned_model(tmp_path)
    batch = collate(items_of(model), model.delays, model.codebook_size)
    first = float(model.loss(batch)["duration_loss"])
    overfit(model, batch)
    assert float(model.loss(batch)["duration_loss"]) < 0.2 * first
    model.eval()
    model.save(tmp_path / "m")
    loaded = T2SModel.load(tmp_path / "m")
    ids = [model.text.encode(t).chunks[0] for t in TEXTS]
    a, _ = model.generate(ids, [0, 1, 0, 1], max_frames=60)
    b, _ = loaded.generate(ids, [0, 1, 0, 1], max_frames=60)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # it learnt the 2-3 frames per token it was shown
    assert all(2 * len(i) - 2 <= c.shape[1] <= 3 * len(i) + 2 for i, c in zip(ids, a))


# ------------------------------------------------------------------------------------------- the parallel decoder

def parallel_model(tmp_path, **extra) -> T2SModel:
    path = tmp_path / "backbone.json"
    path.write_text(json.dumps(TINY_BACKBONE))
    extra = {"text_window": 1, "alignment": "ctc", "decoder": "parallel", "frame_mode": "parallel", **extra}
    cfg = T2SConfig(backbone=str(path), head_rank=8, tokenizer_vocab_size=40, dropout=0.0, max_text_tokens=192, **extra)
    books = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 0.5, 0.25, 0.125])[:, None, None]
    return build_model(cfg, TEXTS, 4, 16, ["a", "b"], {"revision": "r" * 64, "ref": "fake"}, seed=0, codebooks=books)


def test_parallel_decoder_needs_aligned_parallel_frames_and_the_stage1_codebooks(tmp_path):
    with pytest.raises(UsageError, match="alignment: ctc and model.frame_mode: parallel"):
        parallel_model(tmp_path, frame_mode="delay")
    with pytest.raises(UsageError, match="alignment: ctc"):
        parallel_model(tmp_path, alignment="constant_rate", progress_buckets=4)
    path = tmp_path / "backbone.json"
    cfg = T2SConfig(backbone=str(path), head_rank=8, tokenizer_vocab_size=40, text_window=1, alignment="ctc",
                    decoder="parallel", frame_mode="parallel")
    with pytest.raises(UsageError, match="codebooks"):
        build_model(cfg, TEXTS, 4, 16, ["a", "b"], {"revision": "r" * 64, "ref": "fake"})
    model = parallel_model(tmp_path)
    assert isinstance(model, ParallelT2S)
    assert not hasattr(model, "level_embed") and not hasattr(model, "head_out")  # it reads no codes and has no per-level heads


def test_parallel_decoder_regresses_the_stage1_vectors_and_speaks_stage1_codes(tmp_path):
    model = parallel_model(tmp_path)
    items = items_of(model)
    batch = collate(items, model.delays, model.codebook_size)
    first = model.loss(batch)
    # one target per real frame (no end-of-audio step), the squared error to the codewords' sum, plus durations
    assert int(first["frames"]) == sum(item[1].shape[1] for item in items)
    overfit(model, batch)
    assert float(model.loss(batch)["vector_mse"]) < 0.5 * float(first["vector_mse"])
    # the codes are stage 1's greedy residual assignment of the vectors: level 0 the nearest codeword
    vectors = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    codes = model.encode_vectors(vectors)
    assert torch.equal(codes[:, 0], torch.cdist(vectors, model.codebooks[0]).argmin(1))
    rest = vectors - model.codebooks[0][codes[:, 0]]
    assert torch.equal(codes[:, 1], torch.cdist(rest, model.codebooks[1]).argmin(1))
    # generation: the predicted durations, deterministic, and equal in a batch and alone
    ids = [model.text.encode(t).chunks[0] for t in TEXTS]
    together, capped = model.generate(ids, [0, 1, 0, 1], max_frames=200, temperature=0.9)
    alone = [model.generate([i], [s], max_frames=200)[0][0] for i, s in zip(ids, [0, 1, 0, 1])]
    assert capped == [False] * 4 and all(torch.equal(a, b) for a, b in zip(together, alone))
    assert all(2 * len(i) - 2 <= c.shape[1] <= 3 * len(i) + 2 for i, c in zip(ids, together))  # it learnt 2-3 frames a token
    forced, _ = model.generate(ids, [0, 1, 0, 1], max_frames=200, target_frames=[item[1].shape[1] for item in items])
    real = torch.cat([item[1].T for item in items])
    said = torch.cat([c.T for c in forced])
    assert said.shape == real.shape and (said[:, 0] == real[:, 0]).float().mean() > 0.5  # it learnt what each frame says
    short, capped = model.generate(ids, [0, 1, 0, 1], max_frames=3)
    assert [c.shape[1] for c in short] == [3] * 4 and capped == [True] * 4


def test_parallel_decoder_round_trips_save_load_with_its_codebooks(tmp_path):
    model = parallel_model(tmp_path)
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vector_dim"] == 8
    loaded = T2SModel.load(tmp_path / "m")
    assert torch.equal(loaded.codebooks, model.codebooks)
    ids = [model.text.encode(t).chunks[0] for t in TEXTS]
    a, _ = model.generate(ids, [0, 1, 0, 1], max_frames=60)
    b, _ = loaded.generate(ids, [0, 1, 0, 1], max_frames=60)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
