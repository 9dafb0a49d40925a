"""Stage-1 RVQ settings study: which ResidualVQ settings use every code of every level on held-out speech features?

Run: `python experiments/rvq_settings.py [--run runs/demo/stage1]` after `speechless stage1 train` has cached
features. Options: `--steps N`, `--batch N`, `--kmeans-sample N`, `--variants a,b,...`, `--train-split`, `--eval-split`
(several joined with '+', e.g. dev+test), `--out results.json` (finished variants are reused when the features and
settings are the same).

Features: the very vectors stage 1 trains on: the 1024-d activations entering `output_proj` (forward hook
`inputs[0]`, valid frames only), read from the run's feature cache. For the demo run: espeak-ng speech of the demo
corpus (split by sentence) through the tiny random-weight Gemma 4 audio encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CACHE = ROOT / "runs" / "rvq_study"


# ----------------------------------------------------------------------------------------------------------------------
# Step 1: features — exactly the ones stage 1 trains on, read from a stage-1 run's feature cache
# ----------------------------------------------------------------------------------------------------------------------

def load_features(run_dir: Path, train_split: str, eval_split: str) -> dict:
    """Train / held-out vectors (float32, N x dim) from `run_dir/work/features/<split>/shard-*.safetensors`."""
    from speechless.speech.features import read_shard

    arrays, summary = {}, {"run": str(run_dir)}
    for role, split in (("train", train_split), ("eval", eval_split)):
        shards = sorted(p for name in split.split("+") for p in (run_dir / "work" / "features" / name).glob("shard-*.safetensors"))
        if not shards:
            raise SystemExit(f"{run_dir}: no cached features for split '{split}'; run `speechless stage1 train` first")
        utterances = [u for shard in shards for u in read_shard(shard)]
        arrays[role] = torch.cat([u.vectors for u in utterances])
        summary[f"{role}_split"] = split
        summary[f"{role}_utterances"] = len(utterances)
        summary[f"{role}_frames"] = int(arrays[role].shape[0])
    return dict(train=arrays["train"], eval=arrays["eval"], summary=summary)


# ----------------------------------------------------------------------------------------------------------------------
# Step 2: the study
# ----------------------------------------------------------------------------------------------------------------------

# name -> (description, RVQConfig overrides, init source). Init source: None = vqp handles init itself on the first
# batch; "kmeans:<standardize>" = our residual k-means, fitted once per standardisation and shared between variants.
# The study's baselines (vqp defaults, vqp's own k-means init, learnable codebooks) used RVQConfig options that left the
# product once measured (docs/results.md, "Options measured and removed"); run them from commit f45383e.
VARIANTS: dict[str, tuple[str, dict, str | None]] = {
    "c0_rkm_only": ("our residual k-means, plain on every level (global std), no fine-tuning",
                    dict(standardize="global", equal_norm_from_level=None, kmeans_iters=12,
                         finetune=False), "kmeans:plain"),
    "c1_rkm_ema": ("our plain residual k-means (global std) + EMA fine-tune, decay 0.99, dead-code 0.1",
                   dict(standardize="global", equal_norm_from_level=None, kmeans_iters=12,
                        decay=0.99, dead_code_threshold=0.1), "kmeans:plain"),
    "e1_gainshape": ("our residual k-means, levels 2-8 gain-shape (equal-norm), global std, no fine-tuning",
                     dict(standardize="global", equal_norm_from_level=1, null_code=False, finetune=False),
                     "kmeans:gainshape1"),
    "e1_gainshape_ema": ("e1 init + EMA fine-tune, decay 0.99, dead-code 0.1",
                         dict(standardize="global", equal_norm_from_level=1, null_code=False, decay=0.99,
                              dead_code_threshold=0.1), "kmeans:gainshape1"),
    "e1_gainshape_ema_nodead": ("e1 init + EMA fine-tune, decay 0.99, no dead-code replacement",
                                dict(standardize="global", equal_norm_from_level=1, null_code=False, decay=0.99,
                                     dead_code_threshold=0.0), "kmeans:gainshape1"),
    "e0_gainshape_all": ("our residual k-means, ALL levels gain-shape (equal-norm), global std, no fine-tuning",
                         dict(standardize="global", equal_norm_from_level=0, null_code=False, finetune=False),
                         "kmeans:gainshape0"),
    "n1_nullcode": ("levels 2-8 gain-shape with a null code (`null_code`), no fine-tuning",
                    dict(standardize="global", equal_norm_from_level=1, null_code=True, finetune=False),
                    "kmeans:gainshape1null"),
    "n1_nullcode_ema": ("n1 init + EMA fine-tune, decay 0.99, dead-code 0.1",
                        dict(standardize="global", equal_norm_from_level=1, null_code=True, decay=0.99,
                             dead_code_threshold=0.1), "kmeans:gainshape1null"),
}


def evaluate(model, x_eval: torch.Tensor) -> dict:
    from speechless.core.metrics import quantizer_metrics

    model.eval()
    t0 = time.perf_counter()
    codes = model.encode(x_eval)
    t_enc = time.perf_counter() - t0
    x_hat = model.decode(codes)
    out = quantizer_metrics(x_eval, x_hat, codes, model.codebook_size)
    counts = [torch.bincount(codes[:, level], minlength=model.codebook_size) for level in range(codes.shape[1])]
    # the share of held-out frames on the 10 most used codes, and on the last code (the null code, where there is one)
    out["top10_share"] = [round(float(c.sort(descending=True).values[:10].sum() / c.sum()), 4) for c in counts]
    out["last_code_share"] = [round(float(c[-1] / c.sum()), 4) for c in counts]
    out["encode_vectors_per_s"] = x_eval.shape[0] / t_enc
    return out


def run_variant(name: str, train: torch.Tensor, x_eval: torch.Tensor, steps: int, batch: int, seed: int,
                init_cache: dict, kmeans_sample: int | None = None) -> dict:
    from speechless.speech.rvq import RVQConfig, SpeechRVQ

    desc, overrides, init_src = VARIANTS[name]
    cfg = RVQConfig(**overrides, **({} if kmeans_sample is None else dict(kmeans_sample=kmeans_sample)))
    torch.manual_seed(seed)
    model = SpeechRVQ(cfg, train.shape[1])
    t0 = time.perf_counter()
    init_info = None
    if init_src is not None:
        if init_src not in init_cache:
            t_init = time.perf_counter()
            model.initialize(train, seed=seed)
            init_cache[init_src] = dict(state=model.tensors(), seconds=time.perf_counter() - t_init)
        else:
            model.load_tensors(init_cache[init_src]["state"])
            model.needs_usage_rescale.fill_(True)
        init_info = round(init_cache[init_src]["seconds"], 1)
    else:
        model.initialize(train, seed=seed)  # standardisation stats only; vqp initialises the codebooks
    t_after_init = time.perf_counter()
    nsteps = steps if cfg.finetune else 0
    gen = torch.Generator().manual_seed(seed + 100)
    model.train()
    log = []
    for step in range(nsteps):
        rows = torch.randint(0, train.shape[0], (batch,), generator=gen)
        out = model.train_step(train[rows])
        if step % max(1, nsteps // 5) == 0 or step == nsteps - 1:
            log.append(dict(step=step, **{k: round(v, 5) for k, v in out.items()}))
    t_train = time.perf_counter() - t_after_init
    metrics = evaluate(model, x_eval)
    # the "same loss" on held-out data (eval mode: no EMA update, no commitment term reported by vqp in eval)
    return dict(name=name, description=desc, config=cfg.model_dump(mode="json"), steps=nsteps, batch=batch,
                init_seconds=init_info, train_seconds=round(t_train, 1), total_seconds=round(time.perf_counter() - t0, 1),
                train_log=log, **metrics), model


def markdown_table(results: list[dict]) -> str:
    lines = ["| variant | steps x batch | MSE | NMSE | cosine | centred cos | util min / mean | util per level | "
             "perplexity per level | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        util = r["utilization"]
        lines.append(
            f"| {r['name']} | {r['steps']} x {r['batch']} | {r['mse']:.4f} | {r['nmse']:.3f} | {r['cosine']:.4f} | "
            f"{r['centered_cosine']:.3f} | {min(util):.3f} / {sum(util) / len(util):.3f} | "
            f"{' '.join(f'{u:.3f}' for u in util)} | {' '.join(f'{p:.0f}' for p in r['perplexity'])} | "
            f"{r['train_seconds']}{' + init ' + str(r['init_seconds']) if r['init_seconds'] else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo" / "stage1"), help="stage-1 run folder whose feature cache to use")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="dev")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kmeans-sample", type=int, default=None, help="rvq.kmeans_sample (default: the schema's)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(CACHE / "results.json"))
    parser.add_argument("--save-best", default=str(CACHE / "best"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 2)
    data = load_features(Path(args.run), args.train_split, args.eval_split)
    print(json.dumps(data["summary"]), flush=True)
    from speechless.core.io import write_json
    from speechless.speech.rvq import encode_speed

    train, x_eval = data["train"], data["eval"]
    out_path = Path(args.out)
    results: list[dict] = []
    saved = json.loads(out_path.read_text()) if out_path.is_file() else {}
    same = saved.get("features") == data["summary"] and saved.get("kmeans_sample") == args.kmeans_sample
    previous = {r["name"]: r for r in saved.get("results", [])} if same else {}
    init_cache: dict = {}
    best = None
    for name in args.variants.split(","):
        if name in previous and previous[name]["steps"] in (0, args.steps) and previous[name]["batch"] == args.batch:
            results.append(previous[name])
            print(f"{name}: cached", flush=True)
            continue
        res, model = run_variant(name, train, x_eval, args.steps, args.batch, args.seed, init_cache, args.kmeans_sample)
        results.append(res)
        print(f"{name}: util {[round(u, 3) for u in res['utilization']]} mse {res['mse']:.4f} nmse {res['nmse']:.3f} "
              f"cos {res['cosine']:.4f} ccos {res['centered_cosine']:.3f} train {res['train_seconds']}s", flush=True)
        if min(res["utilization"]) >= 0.95 and (best is None or res["mse"] < best[0]):
            best = (res["mse"], name, model)
        write_json(out_path, dict(machine=machine(), features=data["summary"], steps=args.steps, batch=args.batch,
                                  kmeans_sample=args.kmeans_sample, results=results))
    speed = None
    if best is not None:
        best[2].save(args.save_best)
        speed = encode_speed(best[2], n=8192)
        # agreement of our encode with ResidualVQ's own eval indices on held-out features
        m = best[2].eval()
        sub = x_eval[:8192]
        with torch.no_grad():
            _, ref, _ = m.rvq(m.standardize(sub).unsqueeze(0))
        ours = m.encode(sub)
        speed["heldout_identical_rows"] = float((ours == ref[0]).all(1).float().mean())
        speed["heldout_identical_codes"] = float((ours == ref[0]).float().mean())
        speed["best"] = best[1]
    write_json(out_path, dict(machine=machine(), features=data["summary"], steps=args.steps, batch=args.batch,
                              kmeans_sample=args.kmeans_sample, results=results, encode_speed=speed))
    print(markdown_table(results))
    print(json.dumps(speed, indent=2))


def machine() -> dict:
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
