"""`benchmarks/full_size.py --scale smoke` runs every part (counts, tokenize, encode, rvq_train, stage2, stage3) at
reduced sizes on CPU: the full-size benchmark cannot rot. Its checks (published parameter counts and their formulas,
use_cache on/off loss equality, DUS/LoRA identity incl. KV-shared layers, one training step, adapter save/reload) must
pass and every timing must be a positive number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_full_size_benchmark_smoke_scale(tmp_path):
    out = tmp_path / "full_size_smoke.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "full_size.py"), "--scale", "smoke", "--device", "cpu",
                           "--threads", "1", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["parts_run"] == ["counts", "tokenize", "encode", "rvq_train", "stage2", "stage3"]
    checks = {(c["part"], c["check"]): c for c in report["checks"]}
    assert all(c["passed"] for c in checks.values()), [c for c in checks.values() if not c["passed"]]
    names = " | ".join(name for _, name in checks)
    for expected in ("audio tower", "E2B total with PLE", "PLE tables = vocab x layers", "stage-2 backbone formula", "use_cache on and off",
                     "gradient checkpointing", "DUS after all", "DUS dropped", "LoRA r8 is the base at init", "save and reload",
                     "same real tokens"):
        assert expected in names, expected
    counts = report["parts"]["counts"]
    assert counts["audio_tower"] == 304_824_608 and counts["stage2_backbone"]["total"] == counts["stage2_backbone"]["formula"]
    timings = [row for row in report["rows"] if row["part"] != "counts" and isinstance(row["ours"], (int, float))]
    assert len(timings) >= 8
    for row in timings:
        assert row["ours"] > 0 and (row["anchor"] == "" or row["anchor"] > 0), row
    for part in ("tokenize", "encode", "rvq_train", "stage2", "stage3"):
        assert report["parts"][part], part
    assert report["parts"]["stage3"]["train"]["ours"]["seconds"] > 0 and report["parts"]["stage3"]["train"]["trainer"]["seconds"] > 0
    assert "| part | measure | ours | anchor | ratio | bar | met? |" in report["table"]
