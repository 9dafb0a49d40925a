"""Two CPU processes (gloo, torch.multiprocessing spawn with torchrun's environment variables) on the real stage code:
tokenizing a manifest on 2 ranks == on 1 rank, stage 1 keeps identical codebooks on both ranks, stage 2 trains
with DDP, stage-3 training on 2 ranks takes the steps of 1 rank (also across a kill and resume), and the whole
stage-3 recipe runs on 2 ranks with rank 0 writing. One spawned job runs them all so the processes start (and import
torch) once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import stage1_overrides
from test_llm import TEXTS, TINY_AUDIO, conversation
from test_stage2 import overrides as stage2_overrides

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Stage-3 training loop: 7 conversations of different lengths, global batches of 3 (on 2 ranks: 2 + 1 items, and the
# epoch's last batch of 1 leaves a rank with nothing: it computes one item with no weight). A small learning rate:
# Adam divides each gradient element by its own running size, so float rounding of near-zero elements moves weights
# by up to ~lr, and at lr 1e-2 this toy model's steps then part ways within 3 steps even in one process (measured: a
# 1e-7 nudge after step 1 changes the step-4 gradient by 116 %); at 1e-4 they stay within 0.1 %.
LOOP = dict(steps=6, batch_size=3, lr=1e-4, warmup=1, fingerprint="f", seed=0, checkpoint_every=2, what="test")


def stage3_loop_model(root: Path):
    """A tiny Gemma 4 with LoRA (test_llm's model) and the conversations the loop trains on."""
    from speechless.llm.adapters import AdapterConfig
    from speechless.llm.base import BaseConfig, build_demo_tokenizer
    from speechless.llm.model import load_speech_lm
    from speechless.speech.encoders import EncoderConfig, load_encoder

    root.mkdir(parents=True, exist_ok=True)
    (root / "audio.json").write_text(json.dumps(TINY_AUDIO))
    encoder_cfg = EncoderConfig(source=str(root / "audio.json"), device="cpu", batch_size=2)
    base = BaseConfig(source=str(Path(__file__).parents[1] / "configs/llm/tiny_gemma4.json"), device="cpu")
    model = load_speech_lm(base, encoder_cfg, load_encoder(encoder_cfg).revision, build_demo_tokenizer(TEXTS, 200))
    model.attach(AdapterConfig(kind="lora", lora_rank=4))
    answers = ["Watoto walichora picha.", "The teacher ate rice at home in the morning.", "Mwalimu alikula wali."]
    examples = [model.encode(conversation(answers[i % 3]), [torch.randn(6 + 3 * i, 32, generator=torch.Generator().manual_seed(i))])
                for i in range(7)]
    return model, examples


def stage3_loop(root: Path, work: Path, die_at_call: int | None = None) -> dict:
    """Train the loop model (optionally killed at the n-th loss call, then resumed from work/). Returns its trainable
    weights and `grads`: each step's gradient (after the DDP all-reduce, before clipping), one row per step."""
    from speechless.llm.adapt import train_loop
    from speechless.llm.model import SpeechLM

    real_loss, real_clip, calls, grads = SpeechLM.loss, torch.nn.utils.clip_grad_norm_, {"n": 0}, []

    def dying_loss(self, batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == die_at_call:
            raise KeyboardInterrupt
        return real_loss(self, batch, **kwargs)

    def recording_clip(params, max_norm):
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        return real_clip(params, max_norm)

    SpeechLM.loss, torch.nn.utils.clip_grad_norm_ = dying_loss, recording_clip
    try:
        model, examples = stage3_loop_model(root)
        try:
            train_loop(model, examples, work=work, **LOOP)
        except KeyboardInterrupt:
            model, examples = stage3_loop_model(root)
            train_loop(model, examples, work=work, **LOOP)
    finally:
        SpeechLM.loss, torch.nn.utils.clip_grad_norm_ = real_loss, real_clip
    return {**{name: p.detach().clone() for name, p in model.trainable_parameters().items()}, "grads": torch.stack(grads[-LOOP["steps"]:])}


def stage3_overrides(base: Path, corpus: str) -> list[str]:
    """The stage-3 recipe on the job's own stage 1 and stage 2, as small as it goes (1 adapter, no topline)."""
    return [f"data.stage1={base / 'stage1'}", f"data.stage2={base / 'stage2_own'}", f"data.manifest={corpus}",
            f"run.out_dir={base / 'stage3'}", f"store.root={base / 'store3'}", f"pretrain.out_dir={base / 'stage3_base'}",
            f"base.source={Path(__file__).parents[1] / 'configs/llm/tiny_gemma4.json'}", "base.device=cpu",
            "data.voices_per_sentence=1", "data.eval_voices_per_sentence=1", "data.generate.max_seconds=1",
            "pretrain.enabled=true", "pretrain.steps=2", "pretrain.batch_size=8", "pretrain.vocab_size=120", "train.steps=3", "train.batch_size=4",
            "train.checkpoint_every=2", "eval.max_new_tokens=3", "eval.batch_size=4", "compare.real_speech_topline=false"]


def _rank_job(rank: int, port: int, paths: dict) -> None:
    """One rank of the job: stage 1 train, tokenize the manifest through the CLI, stage 2 train, the stage-3 training
    loop (straight, and killed + resumed), stage 2 on this stage 1 and the stage-3 recipe on both."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from speechless.cli import run
    from speechless.core.config import load_config
    from stages.stage1_rvq import Stage1Config
    from stages.stage1_rvq import train as train_stage1
    from stages.stage2_t2s import Stage2Config
    from stages.stage2_t2s import train as train_stage2

    base = Path(paths["base"])
    report = {}
    cfg1 = load_config(Stage1Config, None, stage1_overrides(Path(paths["corpus"]), Path(paths["encoder"]),
                                                            base / "stage1", base / "store1"))
    report["stage1"] = train_stage1(cfg1)
    report["tokenize_exit"] = run(["tokenize", "audio", "--tokenizer", str(base / "stage1"), "--manifest", paths["corpus"],
                                   "--output", str(base / "tokens_2ranks.jsonl")])
    cfg2 = load_config(Stage2Config, None, stage2_overrides(Path(paths["stage2_base"]), base / "stage2",
                                                            "train.steps=4", "probe.steps=4", "eval.max_utterances=2"))
    stage2 = train_stage2(cfg2)
    report["stage2"] = {"eval_done": stage2["eval"] is not None, "rank": stage2["rank"] if "rank" in stage2 else 0}
    from speechless.core.io import save_tensors
    from stages.stage3_llm import Stage3Config
    from stages.stage3_llm import train as train_stage3

    model_dir = base / f"loop_model_rank{rank}"  # each rank writes its model's audio config itself
    save_tensors(base / f"loop_straight_rank{rank}.safetensors", stage3_loop(model_dir, base / "loop_straight"))
    save_tensors(base / f"loop_resumed_rank{rank}.safetensors", stage3_loop(model_dir, base / "loop_resumed", die_at_call=4))
    own = stage2_overrides(Path(paths["stage2_base"]), base / "stage2_own", "train.steps=4", "probe.steps=4", "eval.max_utterances=2",
                           f"data.stage1={base / 'stage1'}")
    train_stage2(load_config(Stage2Config, None, own))
    stage3 = train_stage3(load_config(Stage3Config, None, stage3_overrides(base, paths["corpus"])))
    report["stage3"] = {"eval_done": stage3["eval"] is not None}
    dist.destroy_process_group()
    (base / f"rank{rank}.json").write_text(json.dumps(report, default=str))


@pytest.fixture(scope="module")
def job(corpus, encoder_json, stage2_base, tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    paths = {"base": str(base), "corpus": str(corpus), "encoder": str(encoder_json), "stage2_base": str(stage2_base)}
    mp.start_processes(_rank_job, args=(_free_port(), paths), nprocs=WORLD, join=True, start_method="spawn")
    return base, [json.loads((base / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_stage1_codebooks_identical_on_both_ranks(job):
    base, reports = job
    hashes = [r["stage1"]["codebooks_sha256"] for r in reports]
    assert hashes[0] == hashes[1]
    assert reports[0]["stage1"]["eval"] is not None and reports[1]["stage1"]["eval"] is None  # rank 0 alone evaluates
    assert (base / "stage1" / "model.safetensors").is_file()
    # the checkpoint rank 0 wrote holds the codebooks both ranks trained
    from speechless.speech.encoders import weights_sha256
    from speechless.speech.rvq import SpeechRVQ

    assert weights_sha256(SpeechRVQ.load(base / "stage1")) == hashes[0]
    history = json.loads((base / "stage1" / "metrics.json").read_text())["history"]
    assert history[0]["step"] == 0 and "eval" in history[0]  # the initialised codebooks, evaluated on rank 0
    assert len(history) == 7 and all(h["train_mse"] > 0 for h in history[1:])


def test_tokenizing_on_two_ranks_equals_one_rank(job, corpus, cli):
    base, reports = job
    assert [r["tokenize_exit"] for r in reports] == [0, 0]
    one_rank = base / "tokens_1rank.jsonl"
    result = cli("tokenize", "audio", "--tokenizer", base / "stage1", "--manifest", corpus, "--output", one_rank)
    assert result.exit_code == 0, result.stderr
    two_ranks = (base / "tokens_2ranks.jsonl").read_bytes()
    assert two_ranks == one_rank.read_bytes()
    assert len(two_ranks.splitlines()) == sum(1 for line in open(corpus) if line.strip())


def test_stage2_trains_with_ddp_on_two_ranks(job):
    base, reports = job
    assert reports[0]["stage2"]["eval_done"] and not reports[1]["stage2"]["eval_done"]
    metrics = json.loads((base / "stage2" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert all(h["grad_norm"] > 0 for h in metrics["history"])


def test_stage3_training_on_two_ranks_takes_the_one_rank_steps(job, tmp_path):
    """DDP over the LoRA weights: both ranks end with the same weights, and every step's gradient equals (to float
    rounding) the one of one process training on the same global batch; a run killed at step 4 and resumed on 2 ranks
    ends with exactly the weights of the straight run."""
    from speechless.core.io import load_tensors

    base, _ = job
    straight = [load_tensors(base / f"loop_straight_rank{r}.safetensors") for r in range(WORLD)]
    resumed = [load_tensors(base / f"loop_resumed_rank{r}.safetensors") for r in range(WORLD)]
    torch.set_num_threads(1)
    one_rank = stage3_loop(tmp_path / "model", tmp_path / "work")
    assert set(straight[0]) == set(one_rank) and any("lora_A" in name for name in one_rank)
    for name in one_rank:
        if name != "grads":
            assert torch.equal(straight[0][name], straight[1][name]), name  # the ranks never drift apart
            assert torch.equal(resumed[0][name], straight[0][name]), name  # killed + resumed == straight, bit for bit
            assert torch.equal(resumed[1][name], straight[0][name]), name
    # the steps themselves are compared, as gradients (see LOOP)
    two, one = straight[0]["grads"], one_rank["grads"]
    assert two.shape == one.shape == (LOOP["steps"], sum(v.numel() for k, v in one_rank.items() if k != "grads"))
    assert (one.norm(dim=1) > 0).all()
    relative = (two - one).norm(dim=1) / one.norm(dim=1)
    assert relative[0] < 1e-5 and (relative < 1e-3).all(), relative.tolist()


def test_stage3_recipe_runs_on_two_ranks_and_rank0_writes(job):
    base, reports = job
    assert [r["stage3"]["eval_done"] for r in reports] == [True, False]  # rank 0 alone reports
    out = base / "stage3"
    assert (out / "adapter.safetensors").is_file() and (out / "metrics.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["variants"]["synthetic_speech/lora"]["history"][-1]["step"] == 3
    # the two ranks' synthetic speech parts were merged into one cache, in text order, and the parts removed
    speech = out / "work" / "speech"
    caches = sorted(p.name for p in speech.iterdir())
    assert len(caches) == 1 and caches[0].startswith("stage2_"), caches  # no part files left
    ids = [json.loads(line)["id"] for line in (speech / caches[0]).read_text().splitlines()]
    train_rows = [json.loads(line) for line in (out / "work" / "data" / "train.jsonl").read_text().splitlines()]
    spoken = list(dict.fromkeys(part["utterance"] for row in train_rows for m in row["messages"] if m["role"] == "user"
                                for part in m["content"] if part["type"] == "speech"))
    assert ids == spoken and len(ids) >= 2


def test_pipeline_under_torchrun_is_refused_before_writing(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = cli("run", "-c", Path(__file__).parents[1] / "configs/pipeline/demo.yaml", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "launch it without torchrun" in result.stderr
    assert not (tmp_path / "run").exists()
