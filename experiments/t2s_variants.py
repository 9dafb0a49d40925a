"""Stage 2: compare frame-modelling variants (and speaker conditioning) at the same budget.

Every variant runs the full stage-2 recipe (`stages.stage2_t2s.train`) from the same config, seed, data, step count and
batch size; only the variant's overrides differ (the delay variants have identical parameter counts; speaker
conditioning adds one embedding per speaker). The CTC probe is trained once and shared (same data, same seed), so every
variant is judged by the same probe. Prints a markdown table and writes `variants.json` in --out.

    python benchmarks/t2s_variants.py --stage1 runs/stage2_dev/stage1 --out runs/stage2_dev/variants \
        --variants delay,parallel,coarse_first --set train.steps=600
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

VARIANTS = {
    "delay": ["model.frame_mode=delay"],
    "parallel": ["model.frame_mode=parallel"],
    "coarse_first": ["model.frame_mode=coarse_first"],
    "delay_no_speaker": ["model.frame_mode=delay", "model.speaker_embedding=false"],
    "parallel_no_speaker": ["model.frame_mode=parallel", "model.speaker_embedding=false"],
}


def run(args) -> list[dict]:
    import torch

    from speechless.core.config import load_config
    from stages.stage2_t2s import Stage2Config, train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = []
    probe_src = None
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        run_dir = out / name
        overrides = [f"data.stage1={args.stage1}", f"run.out_dir={run_dir}", *VARIANTS[name], *(args.set or [])]
        cfg = load_config(Stage2Config, args.config, overrides)
        if probe_src is not None and not (run_dir / "probe").exists():
            shutil.copytree(probe_src, run_dir / "probe")
        started = time.time()
        summary = train(cfg)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        probe_src = run_dir / "probe"
        ev = metrics["eval"]
        results.append({
            "variant": name, "overrides": VARIANTS[name], "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
            "parameters": metrics["model"]["parameters"], "train_seconds": metrics["train"]["seconds"],
            "eval_loss": metrics["eval_loss"]["loss"] if metrics["eval_loss"] else None,
            "eval_level_loss": metrics["eval_loss"]["level_loss"] if metrics["eval_loss"] else None,
            "probe_cer_real": ev["probe_cer_real"], "probe_cer_generated": ev["probe_cer_generated"],
            "duration_ratio": ev["duration"]["ratio_mean"], "duration_abs_rel_err": ev["duration"]["abs_relative_error_mean"],
            "capped": ev["duration"]["capped"], "dtw_centered_cosine": ev["dtw_centered_cosine"],
            "generation_frames_per_second": ev["generation"]["frames_per_second"],
            "wall_seconds": round(time.time() - started, 1), "stage1_revision": summary["stage1"]["revision"],
        })
        (out / "variants.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")
    return results


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(results: list[dict]) -> str:
    lines = ["| variant | params | train s | eval loss (L0 / mean) | probe CER real | probe CER generated | ratio | dur. ratio | |dur. err| | capped | DTW centred cos |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['parameters'] / 1e6:.2f} M | {r['train_seconds']:.0f} | "
                     f"{r['eval_level_loss'][0]:.3f} / {r['eval_loss']:.3f} | {r['probe_cer_real']:.4f} | {r['probe_cer_generated']:.4f} | "
                     f"{r['probe_cer_generated'] / max(r['probe_cer_real'], 1e-9):.2f} | {r['duration_ratio']:.3f} | "
                     f"{r['duration_abs_rel_err']:.3f} | {r['capped']} | {r['dtw_centered_cosine']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", required=True, help="stage-1 run folder or store ref")
    parser.add_argument("--out", default="runs/stage2_dev/variants")
    parser.add_argument("--config", default="configs/stage2/demo.yaml")
    parser.add_argument("--variants", default="delay,parallel,coarse_first")
    parser.add_argument("--set", action="append", help="extra config override for every variant (repeatable)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    results = run(args)
    print(table(results))


if __name__ == "__main__":
    main()
