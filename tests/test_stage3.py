"""Stage 3 recipe pieces: conversation checks, the demo task set, stage-2/stage-1 version refusal, synthetic speech
cache, resumable training, audio longer than the window, scoring, CLI bad input, shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from test_llm import clip, conversation, make, setup  # noqa: F401  (fixture)
from test_t2s import TINY_BACKBONE, make_fake_stage1

from speechless.core.config import load_config
from speechless.core.errors import UsageError
from speechless.core.io import read_jsonl
from speechless.llm.adapt import adapted_model, score_task, train_loop, vectors_from_tokens
from speechless.llm.adapt import synthetic_tokens as speak
from speechless.llm.instructions import as_text, demo_conversations, read_conversations
from stages.stage3_llm import Stage3Config, train

ROOT = Path(__file__).resolve().parent.parent


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "c1", "messages": conversation()}


@pytest.mark.parametrize("row, message", [
    ({"id": "x", "messages": []}, r"bad.jsonl:2: 'messages' is missing or empty"),
    ({"id": "x", "messages": conversation()[:1]}, r"bad.jsonl:2: the conversation ends without an assistant turn"),
    ({"id": "x", "messages": conversation()[::-1]}, r"bad.jsonl:2: messages\[0\] is a assistant turn"),
    ({"id": "x", "messages": [{"role": "user", "content": [{"type": "speech", "text": " "}]}, {"role": "assistant", "content": "a"}]},
     r"bad.jsonl:2: messages\[0\].content\[0\]: a speech part needs 'text'"),
    ({"id": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     r"bad.jsonl:2: messages\[1\].content: an assistant turn needs non-empty text"),
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    (GOOD, r"bad.jsonl:2: id 'c1' appears twice"),
])
def test_bad_conversations_are_refused_with_file_line_and_field(tmp_path, row, message):
    with pytest.raises(UsageError, match=message):
        read_conversations(write_lines(tmp_path / "bad.jsonl", [GOOD, row]))


def test_demo_task_set_and_text_version():
    sentences = [{"sentence_id": sid, "split": split, "text": "Mtoto anakula.", "translation": "The child eats.", "subject": "The child",
                  "place": "", "verb": "eat"} for sid, split in (("s1", "train"), ("s2", "dev"), ("s3", "test"))]
    manifest = [{"id": f"{s['sentence_id']}-{v}", "sentence_id": s["sentence_id"], "split": s["split"], "speaker_id": v,
                 "audio_filepath": f"/a/{v}.wav"} for s in sentences for v in ("m1", "f2", "m3")]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spath = write_lines(Path(tmp) / "sentences.jsonl", sentences)
        rows = demo_conversations(spath, manifest, "train", ["asr", "ast", "where", "who"], voices_per_sentence=2, seed=0)
        held_out = demo_conversations(spath, manifest, "dev+test", ["asr"], voices_per_sentence=1, seed=0)
    assert sorted(r["id"].split("-")[0] for r in held_out) == ["s2", "s3"]  # '+' joins splits
    assert len(rows) == 2 * 3  # the empty 'place' gives no 'where' question
    assert {r["task"] for r in rows} == {"asr", "ast", "who"} and all(r["closed"] == (r["task"] == "who") for r in rows)
    speech = rows[0]["messages"][0]["content"][1]
    assert speech["type"] == "speech" and speech["text"] == "Mtoto anakula." and speech["utterance"].startswith("s1-")
    text = as_text(rows[0])["messages"][0]["content"]
    assert [p["type"] for p in text] == ["text", "text"] and text[1]["text"] == "Mtoto anakula."


def tiny_stage2(tmp_path: Path) -> tuple[list[dict], list[str], dict]:
    """Fake stage 1 `s1a` (and an unrelated `s1b`), a random tiny stage 2 `s2` trained on s1a, two conversations, and
    the config overrides that point stage 3 at them."""
    from speechless.core.io import sha256_file
    from speechless.t2s.config import T2SConfig
    from speechless.t2s.model import build_model

    make_fake_stage1(tmp_path / "s1a", sentences=6, seed=0)
    make_fake_stage1(tmp_path / "s1b", sentences=6, seed=1)
    (tmp_path / "backbone.json").write_text(json.dumps(TINY_BACKBONE))
    stage1 = {"ref": str(tmp_path / "s1a"), "version": None, "revision": sha256_file(tmp_path / "s1a" / "model.safetensors")}
    model = build_model(T2SConfig(backbone=str(tmp_path / "backbone.json"), tokenizer_vocab_size=40, head_rank=8), ["Ba ka.", "Di mo."],
                        4, 32, ["s1", "s2"], stage1)
    model.save(tmp_path / "s2")
    rows = [{"id": f"c{i}", "task": "asr", "closed": False, "messages": [
        {"role": "user", "content": [{"type": "speech", "text": text, "speaker": "s2", "utterance": f"u{i}"}]},
        {"role": "assistant", "content": text}]} for i, text in enumerate(["Ba ka.", "Di mo."], 1)]
    common = [f"data.stage2={tmp_path / 's2'}", "data.generate.max_seconds=0.4", f"store.root={tmp_path / 'store'}",
              f"data.stage1={tmp_path / 's1a'}"]
    return rows, common, stage1


def synthetic_tokens(cfg: Stage3Config, rows: list[dict], work: Path) -> tuple[dict, dict]:
    """Stage-2 speech of `rows` as the recipe asks for it."""
    return speak(cfg.data.stage2, cfg.data.stage1, cfg.data.generate, cfg.data.synthetic_draws, rows, work, cfg.store, "cpu")


def test_stage2_trained_on_another_stage1_is_refused_and_speech_is_cached(tmp_path):
    rows, common, stage1 = tiny_stage2(tmp_path)
    wrong = load_config(Stage3Config, None, [*common, f"data.stage1={tmp_path / 's1b'}"])
    with pytest.raises(UsageError, match="stage-1 mismatch"):
        synthetic_tokens(wrong, rows, tmp_path / "work")
    cfg = load_config(Stage3Config, None, common)
    tokens, record = synthetic_tokens(cfg, rows, tmp_path / "work")
    assert set(tokens) == {"u1", "u2"} and tokens["u1"]["stage1_revision"] == stage1["revision"]
    assert record["stage1_revision"] == stage1["revision"] and "draws" not in record
    cached = list((tmp_path / "work" / "speech").glob("stage2_*.jsonl"))
    assert len(cached) == 2  # the texts and the generated tokens (named by the stage-2 revision and generation settings)
    again, _ = synthetic_tokens(cfg, rows, tmp_path / "work")
    assert again == tokens  # served from the cache
    reseeded = load_config(Stage3Config, None, [*common, "data.generate.seed=5"])
    other, _ = synthetic_tokens(reseeded, rows, tmp_path / "work")
    assert len(list((tmp_path / "work" / "speech").glob("stage2_*_*.jsonl"))) == 2  # another sample, another cache
    assert any(other[k]["codes"] != tokens[k]["codes"] for k in tokens)


def test_best_of_n_draws_keeps_the_draw_the_stage2_probe_reads_best(tmp_path):
    from speechless.core.metrics import cer
    from speechless.speech.tokens import read_token_jsonl
    from speechless.t2s.probe import CTCProbe, ProbeConfig, train_probe

    rows, common, _ = tiny_stage2(tmp_path)
    cfg = load_config(Stage3Config, None, [*common, "data.synthetic_draws=4"])
    with pytest.raises(UsageError, match=r"data.synthetic_draws=4: the stage-2 checkpoint .* has no CTC probe"):
        synthetic_tokens(cfg, rows, tmp_path / "work")
    real = read_token_jsonl(tmp_path / "s1a" / "tokens" / "train.jsonl")
    probe, _ = train_probe([torch.tensor(r["codes"]) for r in real], [r["text"] for r in real], ProbeConfig(dim=16, steps=3), 4, 32)
    probe.save(tmp_path / "s2" / "probe")
    tokens, record = synthetic_tokens(cfg, rows, tmp_path / "work")
    assert set(tokens) == {"u1", "u2"} and record["draws"]["n"] == 4
    draws = {r["id"]: r for _, r in read_jsonl(next((tmp_path / "work" / "speech").glob("stage2_????????????_????????.jsonl")))}
    assert len(draws) == 8  # 4 draws of each turn were generated and cached
    probe = CTCProbe.load(tmp_path / "s2" / "probe")
    errors = {key: [cer([text], probe.transcribe([torch.tensor(draws[f"{key}#{d}"]["codes"])])) for d in range(4)]
              for key, text in (("u1", "Ba ka."), ("u2", "Di mo."))}
    for key in errors:
        chosen = int(tokens[key]["draw"].rsplit("#", 1)[1])
        assert errors[key][chosen] == min(errors[key]) and tokens[key]["codes"] == draws[f"{key}#{chosen}"]["codes"]
    assert record["draws"]["probe_cer_best"] <= record["draws"]["probe_cer_first_draw"]


def test_synthetic_levels_decode_the_coarse_prefix_and_are_checked_against_stage1(tmp_path):
    from speechless.speech.rvq import SpeechRVQ
    from speechless.speech.tokens import read_token_jsonl

    make_fake_stage1(tmp_path / "s1", sentences=2, seed=0)
    rvq = SpeechRVQ.load(tmp_path / "s1")
    row = read_token_jsonl(tmp_path / "s1" / "tokens" / "train.jsonl")[0]
    codes = torch.tensor(row["codes"]).T  # (frames, levels)
    coarse = vectors_from_tokens(rvq, row, 2)
    assert torch.equal(coarse, rvq.decode(codes[:, :2])) and torch.equal(vectors_from_tokens(rvq, row), rvq.decode(codes))
    assert not torch.allclose(coarse, vectors_from_tokens(rvq, row))
    too_many = load_config(Stage3Config, None, [f"data.stage1={tmp_path / 's1'}", f"run.out_dir={tmp_path / 'out'}",
                                                f"data.synthetic_levels={rvq.num_quantizers + 1}"])
    with pytest.raises(UsageError, match=rf"data.synthetic_levels={rvq.num_quantizers + 1}: stage 1 .* has {rvq.num_quantizers} codebook levels"):
        train(too_many)


@pytest.mark.parametrize("kind", ["lora", "dus"])
def test_every_variant_starts_from_the_same_adapter_whatever_ran_before(setup, kind):  # noqa: F811
    from test_llm import ROOT

    from speechless.llm.adapters import AdapterConfig
    from speechless.llm.base import BaseConfig

    base = BaseConfig(kind="gemma4_audio", source=str(ROOT / "configs/llm/tiny_gemma4.json"), device="cpu")
    make_one = lambda seed: adapted_model(base, setup[1], setup[2], AdapterConfig(kind=kind, dus_blocks=1), seed, setup[3])
    first = {k: v.detach().clone() for k, v in make_one(0).trainable_parameters().items()}
    torch.randn(1000)  # other work in between (text pre-training, an earlier variant) moves the global random state
    second = make_one(0).trainable_parameters()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    if kind == "lora":  # random initial weights (DUS blocks are copies of base blocks with zeroed outputs: no randomness)
        assert any(not torch.equal(first[k], v) for k, v in make_one(1).trainable_parameters().items())


def test_training_resumes_after_a_kill_to_the_same_weights(setup, tmp_path, monkeypatch):  # noqa: F811
    from speechless.llm.adapters import AdapterConfig
    from speechless.llm.model import SpeechLM

    def fresh():
        model = make(setup)
        model.attach(AdapterConfig(kind="dus", dus_blocks=1))
        examples = [model.encode(conversation(a), [torch.randn(8 + i, 32, generator=torch.Generator().manual_seed(i))])
                    for i, a in enumerate(["Watoto walichora picha.", "The teacher ate rice.", "Mwalimu alikula wali."] * 2)]
        return model, examples

    args = dict(steps=6, batch_size=2, lr=1e-2, warmup=1, fingerprint="f", seed=0, checkpoint_every=2, what="test")
    model, examples = fresh()
    train_loop(model, examples, work=tmp_path / "straight", **args)
    expected = {k: v.detach().clone() for k, v in model.trainable_parameters().items()}

    real_loss, calls = SpeechLM.loss, {"n": 0}

    def dying_loss(self, batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed during step 4, after the step-2 checkpoint
        return real_loss(self, batch, **kwargs)

    monkeypatch.setattr(SpeechLM, "loss", dying_loss)
    model, examples = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, examples, work=tmp_path / "killed", **args)
    monkeypatch.setattr(SpeechLM, "loss", real_loss)
    model, examples = fresh()
    train_loop(model, examples, work=tmp_path / "killed", **args)
    for name, value in model.trainable_parameters().items():
        assert torch.equal(value, expected[name]), name


def test_audio_longer_than_the_window_is_split_into_audio_blocks(setup, tmp_path, capsys):  # noqa: F811
    from speechless.llm.adapt import answer_requests

    model = make(setup)
    model.encoder_cfg = model.encoder_cfg.model_copy(update={"max_window_s": 2.0})
    sf.write(tmp_path / "long.wav", clip(4.5), 16000)
    seen = []
    real_encode = model.encode
    model.encode = lambda messages, audio, with_answer=True: seen.append(audio) or real_encode(messages, audio, with_answer)
    answers = answer_requests(model, [{"text": "Transcribe the audio.\n", "audio": str(tmp_path / "long.wav")}, {"text": "Hi", "audio": None}],
                              max_new_tokens=3)
    assert len(answers) == 2
    assert [len(w) for w in seen[0][0]] == [38, 38, 38] and seen[1] == []  # 3 equal windows of 1.5 s, one audio block each
    assert "split into 3 windows" in " ".join(capsys.readouterr().err.split())


def test_real_input_goes_through_stage1_at_the_levels_the_adapter_trained_on(setup, tmp_path):  # noqa: F811
    from speechless.llm.adapt import answer_requests, stage1_round_trip

    make_fake_stage1(tmp_path / "s1", sentences=4, dim=32)  # the tiny audio tower's hook width
    record = {"stage1": {"ref": str(tmp_path / "s1")}, "speech_levels": 2, "quantize_real": False}
    assert stage1_round_trip(record, None) == (None, None)  # the adapter's recorded default: the native path
    assert stage1_round_trip({**record, "quantize_real": True}, False) == (None, None)
    assert stage1_round_trip({**record, "quantize_real": True}, None)[1] == 2
    rvq, levels = stage1_round_trip(record, True)
    assert levels == 2 and rvq.num_quantizers == 4
    model = make(setup)
    sf.write(tmp_path / "a.wav", clip(1.2), 16000)
    seen = []
    real_encode = model.encode
    model.encode = lambda messages, audio, with_answer=True: seen.append(audio[0][0]) or real_encode(messages, audio, with_answer)
    request = [{"text": "Transcribe the audio.\n", "audio": str(tmp_path / "a.wav")}]
    for args in ((), (rvq, levels), (rvq, None)):
        answer_requests(model, request, 2, 1, *args)
    native, coarse, full = seen
    codes = rvq.encode(native)
    assert torch.equal(coarse, rvq.decode(codes[:, :2])) and torch.equal(full, rvq.decode(codes))
    assert not torch.allclose(coarse, full) and not torch.allclose(full, native)


def test_quantizing_many_clips_at_once_gives_each_window_its_own_codes(tmp_path):
    from speechless.llm.adapt import quantized, through_stage1
    from speechless.speech.rvq import SpeechRVQ

    make_fake_stage1(tmp_path / "s1", sentences=4, dim=32)
    rvq = SpeechRVQ.load(tmp_path / "s1")
    gen = torch.Generator().manual_seed(0)
    clips = {"a": [torch.randn(7, 32, generator=gen), torch.randn(3, 32, generator=gen)], "b": [], "c": [torch.randn(11, 32, generator=gen)]}
    together = quantized(rvq, clips, 2)
    assert {k: [w.shape for w in v] for k, v in together.items()} == {k: [w.shape for w in v] for k, v in clips.items()}
    assert all(torch.equal(x, through_stage1(rvq, w, 2)) for k in clips for x, w in zip(together[k], clips[k]))
    assert quantized(rvq, {"b": []}) == {"b": []}


def test_topline_summary_names_what_was_compared_and_reports_ratios_per_task():
    from stages.stage3_llm import summarize

    def scores(asr, where):
        return {"asr": {"score_name": "1-CER", "score": asr}, "where": {"score_name": "exact_match", "score": where}}

    def variant(native, stage1):
        return {"speech": native, "speech_quantized": stage1, "parameters": {"trainable": 10},
                "text_perplexity": {"before": 2.0, "after": 2.0, "relative_change": 0.0}}

    variants = {"synthetic_speech/lora": variant(scores(0.5, 0.38), scores(0.5, 0.45)),
                "real_speech_topline/lora": variant(scores(0.5, 0.49), scores(0.4, 0.0))}
    summary = summarize(variants, scores(0.9, 1.0), "synthetic_speech/lora", ["lora"], {})
    native, stage1 = summary["topline_comparison"]["lora"], summary["topline_comparison_quantized"]["lora"]
    assert native["asr"] == {"metric": "1-CER", "synthetic_speech": 0.5, "real_speech_topline": 0.5, "ratio_to_topline": 1.0}
    assert native["where"]["ratio_to_topline"] == round(0.38 / 0.49, 4)
    assert stage1["asr"]["real_speech_topline"] == 0.4 and stage1["asr"]["ratio_to_topline"] == 1.25
    assert stage1["where"]["ratio_to_topline"] is None  # a topline at 0: no ratio
    assert "meets_0.9" not in json.dumps(summary)  # the product reports ratios; the docs judge them
    alone = summarize({"synthetic_speech/lora": variants["synthetic_speech/lora"]}, scores(0.9, 1.0), "synthetic_speech/lora", ["lora"], {})
    assert "topline_comparison" not in alone and list(alone["adapters"]) == ["synthetic_speech/lora"]


def test_udhr_is_aligned_by_article_and_becomes_text_only_conversations():
    from speechless.data.udhr import udhr_parallel
    from speechless.llm.instructions import text_conversations

    pairs = udhr_parallel("fra", "eng")
    assert len(pairs) > 40
    first = next(p for p in pairs if p[0].startswith("Tous les êtres humains"))
    assert first[1].startswith("All human beings are born free")
    rows = text_conversations(pairs[:3], ["asr", "ast"], ["June", "Carl"], "udhr-fra")
    assert [r["task"] for r in rows] == ["asr", "ast"] * 3
    speech = rows[1]["messages"][0]["content"][1]
    assert speech["text"] == pairs[0][0] and speech["speaker"] == "June" and "audio" not in speech
    assert rows[1]["messages"][1]["content"] == pairs[0][1]
    assert rows[2]["messages"][0]["content"][1]["speaker"] == "Carl"
    english = text_conversations(pairs[:1], ["ast"], [], "udhr-eng", "fr")
    assert english[0]["messages"][0]["content"][0]["text"].startswith("Translate the audio into French.")


def test_scores():
    asr = score_task("asr", False, ["watoto walichora picha", ""], ["Watoto walichora picha.", "Mtoto anakula."])  # 2 errors / 5 words
    assert asr["wer"] == 0.4 and 0 < asr["cer"] < 1 and asr["score"] == round(1 - asr["cer"], 4)
    closed = score_task("where", True, ["at home", "In the classroom."], ["at home", "in the classroom"])
    assert closed["exact_match"] == 1.0 and closed["score"] == 1.0 and "nrefs:1" in closed["bleu_signature"]


def test_cli_bad_input(cli, tmp_path):
    assert cli("chat").exit_code == 2
    result = cli("chat", "--audio", tmp_path / "missing.wav")
    assert result.exit_code == 2 and "missing.wav: file not found" in result.stderr
    bad = write_lines(tmp_path / "m.jsonl", [{"id": "a", "audio_filepath": "a.wav"}, {"id": "b"}])
    result = cli("stage3", "infer", "--manifest", bad, "--model", tmp_path)
    assert result.exit_code == 2 and "m.jsonl:2: a row needs 'audio_filepath'" in result.stderr
    result = cli("stage3", "eval", "--model", tmp_path)
    assert result.exit_code == 2 and "not a stage-3 adapter" in result.stderr
    result = cli("stage3", "eval", "--model", tmp_path, "--conversations", bad, "--demo-manifest", bad)
    assert result.exit_code == 2 and "not both" in result.stderr


def test_real_scale_stage3_config_targets_gemma4_e2b():
    cfg = load_config(Stage3Config, ROOT / "configs" / "stage3" / "gemma4_e2b_twi.yaml")
    assert cfg.base.source == "google/gemma-4-e2b-it" and cfg.base.kind == "gemma4_audio" and not cfg.pretrain.enabled
    assert cfg.data.instructions and cfg.data.eval_instructions and cfg.train.gradient_checkpointing


def test_pushed_adapter_answers_through_chat_and_infer(setup, tmp_path, monkeypatch, cli):  # noqa: F811
    """Save a base like the demo does, train-free adapter on it, push stage3@v1 (adapter files only), then `chat`
    (text and audio) and batched `stage3 infer` load it from the store."""
    from speechless.core.store import open_store
    from speechless.llm.adapters import AdapterConfig
    from speechless.llm.base import BaseConfig
    from speechless.llm.model import load_speech_lm

    _, encoder_cfg, sha, _ = setup
    first = make(setup)
    first.lm.save_pretrained(tmp_path / "base")
    first.tokenizer.save_pretrained(tmp_path / "base")
    model = load_speech_lm(BaseConfig(source=str(tmp_path / "base"), device="cpu"), encoder_cfg, sha)
    assert model.base_sha256 == first.base_sha256  # same weights, same identity, whatever the source
    model.attach(AdapterConfig(kind="dus", dus_blocks=1))
    model.save_adapter(tmp_path / "run", {"stage1": {"ref": "s1"}, "stage2": {"ref": "s2"}})
    info = open_store(root=tmp_path / "store").push("stage3", tmp_path / "run", message="test")
    assert info.version == "v1" and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    monkeypatch.setenv("SPEECHLESS_STORE", str(tmp_path / "store"))
    sf.write(tmp_path / "a.wav", clip(1.2), 16000)
    result = cli("chat", "--audio", tmp_path / "a.wav", "--model", "stage3@v1", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.stderr
    result = cli("chat", "--text", "Transcribe the audio.", "--model", "stage3@v1", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.stderr
    manifest = write_lines(tmp_path / "m.jsonl", [{"id": "a", "audio_filepath": "a.wav"}, {"id": "b", "instruction": "Who does it?"}])
    result = cli("stage3", "infer", "--manifest", manifest, "--model", "stage3@v1", "--max-new-tokens", "3", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == ["a", "b"]


def test_training_resume_with_another_config_warns_and_starts_again(setup, tmp_path, capsys):  # noqa: F811
    from speechless.llm.adapters import AdapterConfig

    model = make(setup)
    model.attach(AdapterConfig(kind="dus", dus_blocks=1))
    examples = [model.encode(conversation(a), [torch.randn(8, 32)]) for a in ["Watoto walichora picha.", "Mwalimu alikula wali."]]
    args = dict(steps=2, batch_size=2, lr=1e-2, warmup=1, seed=0, checkpoint_every=1, what="test")
    train_loop(model, examples, work=tmp_path, fingerprint="first", **args)
    capsys.readouterr()
    history = train_loop(model, examples, work=tmp_path, fingerprint="first", **args)
    assert "resuming at step 2" in capsys.readouterr().err and history[-1]["step"] == 2
    history = train_loop(model, examples, work=tmp_path, fingerprint="changed", **args)
    err = " ".join(capsys.readouterr().err.split())
    assert "holds the resume state of another config; training restarts from step 0" in err
    assert [h["step"] for h in history] == [2]  # trained again from step 0, not resumed


def saved_adapter(setup, folder: Path) -> Path:  # noqa: F811
    """A train-free stage-3 adapter on a saved copy of the tiny base, as `stage3 train` would save it."""
    from speechless.llm.adapters import AdapterConfig
    from speechless.llm.base import BaseConfig
    from speechless.llm.model import load_speech_lm

    _, encoder_cfg, sha, _ = setup
    first = make(setup)
    first.lm.save_pretrained(folder / "base")
    first.tokenizer.save_pretrained(folder / "base")
    model = load_speech_lm(BaseConfig(source=str(folder / "base"), device="cpu"), encoder_cfg, sha)
    model.attach(AdapterConfig(kind="lora"))
    model.save_adapter(folder / "run", {"stage1": {"ref": "s1"}, "stage2": {"ref": "s2"}})
    return folder / "run"


def test_stage3_eval_scores_a_conversation_file_of_real_speech(setup, tmp_path, cli):  # noqa: F811
    run = saved_adapter(setup, tmp_path)
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "a.wav", clip(1.2), 16000)
    speech = {"type": "speech", "text": "Watoto walichora picha.", "audio": "audio/a.wav"}
    rows = [{"id": "r1", "task": "asr", "messages": [{"role": "user", "content": [{"type": "text", "text": "Transcribe the audio.\n"}, speech]},
                                                     {"role": "assistant", "content": "Watoto walichora picha."}]},
            {"id": "r2", "task": "where", "closed": True, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Where does it happen?\n"}, {**speech, "text": ""}]},
                {"role": "assistant", "content": "at school"}]}]
    conversations = write_lines(tmp_path / "held_out.jsonl", rows)
    result = cli("stage3", "eval", "--model", run, "--conversations", conversations, "--max-new-tokens", "3", "--format", "json")
    assert result.exit_code == 0, result.stderr
    scores = json.loads(result.stdout)
    assert set(scores) == {"asr", "where"} and scores["asr"]["n"] == 1 and scores["where"]["score_name"] == "exact match"

    no_audio = write_lines(tmp_path / "text_only.jsonl", [rows[0], {**rows[0], "id": "r3", "messages": conversation()}])
    result = cli("stage3", "eval", "--model", run, "--conversations", no_audio)
    assert result.exit_code == 2 and "text_only.jsonl:2: messages[0].content" in result.stderr
    assert "no real 'audio'" in " ".join(result.stderr.split())
    missing = write_lines(tmp_path / "missing.jsonl", [{**rows[0], "messages": [
        {"role": "user", "content": [{**speech, "audio": "audio/nope.wav"}]}, {"role": "assistant", "content": "x"}]}])
    result = cli("stage3", "eval", "--model", run, "--conversations", missing)
    assert result.exit_code == 2 and "missing.jsonl:1: messages[0].content[0].audio" in result.stderr and "nope.wav not found" in result.stderr


def test_no_listening_baselines_guess_the_commonest_answer_overall_and_per_label():
    from speechless.llm.adapt import no_listening_baselines

    def row(i, task, reply, closed=True):
        return {"id": f"{i}/{task}", "task": task, "closed": closed,
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]}

    train = [row(0, "where", "Shuleni."), row(1, "where", "shuleni"), row(2, "where", "sokoni"), row(3, "where", "sokoni"),
             row(4, "where", "sokoni"), row(5, "asr", "x", closed=False)]
    held = [row(10, "where", "shuleni"), row(11, "where", "sokoni"), row(12, "where", "nyumbani"), row(13, "asr", "y", False)]
    verbs = {"0/where": "soma", "1/where": "soma", "2/where": "pika", "3/where": "pika", "4/where": "pika",
             "10/where": "soma", "11/where": "pika", "12/where": "imba"}  # 'imba' never seen: the overall guess
    result = no_listening_baselines(train, held, verbs, "verb")
    assert set(result) == {"where"}  # open tasks have no guessing baseline
    assert result["where"] == {"n": 3, "commonest_answer": round(1 / 3, 4), "commonest_answer_for_verb": round(2 / 3, 4)}
    assert no_listening_baselines(train, held)["where"] == {"n": 3, "commonest_answer": round(1 / 3, 4)}


def test_compared_variants_name_speech_only_or_all_positions():
    from speechless.llm.adapters import AdapterConfig
    from stages.stage3_llm import variant_adapter, variant_name

    product = AdapterConfig(kind="lora", lora_rank=8, speech_only=True)
    assert variant_name(product) == "lora"
    everywhere = variant_adapter(product, "lora_all_positions")
    assert (everywhere.kind, everywhere.speech_only, everywhere.lora_rank) == ("lora", False, 8)
    assert variant_name(everywhere) == "lora_all_positions"
    dus = variant_adapter(product, "dus")
    assert (dus.kind, dus.speech_only) == ("dus", True)
    assert variant_name(variant_adapter(product.model_copy(update={"speech_only": False}), "dus")) == "dus_all_positions"


def test_claim_checks_need_the_ratio_and_every_no_listening_baseline():
    from speechless.core.metrics import claim_checks

    def summary(where_synth, where_real, asr_synth=0.5):
        return {"main": "synthetic_speech/lora",
                "topline_comparison": {"lora": {"asr": {"ratio_to_topline": round(asr_synth / 0.5, 4)},
                                                "where": {"ratio_to_topline": round(where_synth / where_real, 4)}}},
                "comparison": {"synthetic_speech/lora": {"scores": {"asr": {"score": asr_synth}, "where": {"score": where_synth}}}},
                "no_listening_baselines": {"where": {"n": 10, "commonest_answer": 0.2, "commonest_answer_for_verb": 0.4}}}

    held = claim_checks(summary(0.45, 0.5))
    assert held["holds"] is True and held["tasks"]["where"]["best_no_listening"] == 0.4
    low_ratio = claim_checks(summary(0.44, 0.5))  # 0.88 x the topline
    assert low_ratio["holds"] is False and not low_ratio["tasks"]["where"]["meets_ratio"]
    guessing = claim_checks(summary(0.38, 0.4))  # 0.95 x the topline, but below the verb's commonest answer
    assert guessing["holds"] is False and guessing["tasks"]["where"]["above_no_listening"] is False
    assert claim_checks({"main": "synthetic_speech/lora"})["holds"] is None


def test_seeds_summary_holds_only_when_every_seed_holds():
    from speechless.core.metrics import seeds_summary

    def summary(where):
        return {"main": "synthetic_speech/lora",
                "topline_comparison": {"lora": {"where": {"real_speech_topline": 0.5, "ratio_to_topline": round(where / 0.5, 4)}}},
                "comparison": {"synthetic_speech/lora": {"scores": {"where": {"score": where}}}},
                "no_listening_baselines": {"where": {"n": 10, "commonest_answer": 0.2}}}

    result = seeds_summary({"0": summary(0.5), "1": summary(0.4), "2": summary(0.47)})
    assert [check["holds"] for check in result["seeds"].values()] == [True, False, True]
    assert result["holds_at"] == 2 and result["holds_at_every_seed"] is False
    assert result["mean_score"]["where"] == round((0.5 + 0.4 + 0.47) / 3, 4) and result["mean_real_speech_topline"]["where"] == 0.5
    assert seeds_summary({"0": summary(0.5)})["holds_at_every_seed"] is True
