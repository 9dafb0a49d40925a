"""Two CPU processes (gloo, torch.multiprocessing spawn with torchrun's environment variables) on the real stage code:
tokenizing a manifest on 2 ranks == on 1 rank, stage 1 keeps identical codebooks on both ranks, stage 2 trains
with DDP. One spawned job runs all three so the processes start (and import torch) once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import stage1_overrides
from test_stage2 import overrides as stage2_overrides

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_job(rank: int, port: int, paths: dict) -> None:
    """One rank of the job: stage 1 train, tokenize the manifest through the CLI, stage 2 train."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from speechless.cli import run
    from speechless.config import load_config
    from stages.stage1_rvq import Stage1Config, train as train_stage1
    from stages.stage2_t2s import Stage2Config, train as train_stage2

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
    from speechless.encoder import weights_sha256
    from speechless.rvq import SpeechRVQ

    assert weights_sha256(SpeechRVQ.load(base / "stage1")) == hashes[0]
    history = json.loads((base / "stage1" / "metrics.json").read_text())["history"]
    assert len(history) == 6 and all(h["train_mse"] > 0 for h in history)


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
