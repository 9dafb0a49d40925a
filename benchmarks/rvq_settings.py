"""Stage-1 RVQ settings study: which ResidualVQ settings use every code of every level on held-out speech features?

Run: `python benchmarks/rvq_settings.py` (features are cached under runs/rvq_study/, so reruns skip synthesis).
Options: `--features-only`, `--steps N`, `--batch N`, `--variants a,b,...`, `--out runs/rvq_study/results.json`.

Features: synthetic espeak-ng speech (several voices, speeds, pitches) through a tiny random-weight Gemma 4 audio encoder
(hidden 1024, 2 layers, 8 heads, seed 0); the 1024-d activations entering `output_proj` (forward hook `inputs[0]`),
valid frames only. Split by SENTENCE: every rendition of a sentence lands in the same split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / "runs" / "rvq_study"
SAMPLE_RATE = 16_000

# ----------------------------------------------------------------------------------------------------------------------
# Step 1: features
# ----------------------------------------------------------------------------------------------------------------------

_SW_SUBJECTS = ["mtoto", "mama", "baba", "mwalimu", "rafiki yangu", "mkulima", "daktari", "dada", "kaka", "bibi",
                "babu", "mwanafunzi", "mvuvi", "dereva", "mpishi"]
_SW_VERBS = ["anakula", "anaona", "ananunua", "anapika", "analeta", "anasoma", "anaandika", "anabeba", "anauza", "anapenda"]
_SW_OBJECTS = ["ndizi", "chakula", "kitabu", "maji", "samaki", "mkate", "barua", "chai", "viazi", "nguo", "matunda",
               "wali", "maziwa", "kalamu"]
_SW_PLACES = ["sokoni", "nyumbani", "shuleni", "shambani", "mjini", "kijijini", "hospitalini", "ufukweni", "jikoni",
              "barabarani"]
_SW_TIMES = ["leo", "kesho", "jana", "asubuhi", "jioni", "usiku", "mchana", "kila siku"]

_EN_SUBJECTS = ["the child", "my mother", "the teacher", "a farmer", "the doctor", "my friend", "the driver", "her brother",
                "the old man", "a young girl", "the fisherman", "our neighbour"]
_EN_VERBS = ["eats", "sees", "buys", "cooks", "brings", "reads", "writes", "carries", "sells", "likes"]
_EN_OBJECTS = ["bananas", "the food", "a book", "cold water", "fresh fish", "some bread", "a letter", "hot tea",
               "sweet potatoes", "new clothes", "ripe fruit", "rice", "milk", "a pen"]
_EN_PLACES = ["at the market", "at home", "at school", "on the farm", "in town", "in the village", "at the hospital",
              "by the sea", "in the kitchen", "on the road"]
_EN_TIMES = ["today", "tomorrow", "yesterday", "in the morning", "in the evening", "at night", "every day", "at noon"]

# (espeak voice, language of the text). Swahili voices read Swahili sentences, the others English ones.
_VOICES = ["sw+m1", "sw+f2", "sw+m3", "sw+f4", "sw+m7", "en+m3", "en+f3", "en-us+m2", "en-us+f1", "en-gb+m4", "en+klatt",
           "sw+klatt2"]


def make_sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` distinct simple sentences as (language, text); half Swahili, half English, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    banks = {
        "sw": (_SW_SUBJECTS, _SW_VERBS, _SW_OBJECTS, _SW_PLACES, _SW_TIMES),
        "en": (_EN_SUBJECTS, _EN_VERBS, _EN_OBJECTS, _EN_PLACES, _EN_TIMES),
    }
    while len(out) < n:
        lang = "sw" if len(out) % 2 == 0 else "en"
        subj, verb, obj, place, when = (b[rng.integers(len(b))] for b in banks[lang])
        form = rng.integers(3)
        if form == 0:
            text = f"{subj} {verb} {obj} {place}."
        elif form == 1:
            text = f"{when}, {subj} {verb} {obj} {place}."
        else:
            obj2 = banks[lang][2][rng.integers(len(banks[lang][2]))]
            conj = "na" if lang == "sw" else "and"
            text = f"{subj} {verb} {obj} {conj} {obj2} {place} {when}."
        text = text[0].upper() + text[1:]
        if text not in seen:
            seen.add(text)
            out.append((lang, text))
    return out


def synthesize(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Speak `text` with espeak-ng and return 16 kHz mono float32 audio."""
    import soundfile as sf
    import soxr

    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp.name, text],
                       check=True, capture_output=True)
        audio, rate = sf.read(tmp.name, dtype="float32", always_2d=False)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    return audio


def render_corpus(num_sentences: int, renditions: int, seed: int = 0) -> list[dict]:
    """Every sentence spoken `renditions` times with different (voice, speed, pitch); returns utterance dicts."""
    rng = np.random.default_rng(seed + 1)
    jobs = []
    for sid, (lang, text) in enumerate(make_sentences(num_sentences, seed)):
        voices = [v for v in _VOICES if v.startswith(lang)]
        picks = rng.choice(len(voices), size=renditions, replace=renditions > len(voices))
        for r in range(renditions):
            jobs.append(dict(sentence=sid, lang=lang, text=text, voice=voices[picks[r]],
                             speed=int(rng.integers(120, 200)), pitch=int(rng.integers(25, 75))))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        audios = list(pool.map(lambda j: synthesize(j["text"], j["voice"], j["speed"], j["pitch"]), jobs))
    for job, audio in zip(jobs, audios):
        job["audio"] = audio
    return jobs


def build_encoder(seed: int = 0) -> torch.nn.Module:
    from transformers import Gemma4AudioConfig, Gemma4AudioModel

    torch.manual_seed(seed)
    model = Gemma4AudioModel(Gemma4AudioConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8))
    return model.eval()


@torch.no_grad()
def encode_utterances(model: torch.nn.Module, audios: list[np.ndarray], batch: int = 8) -> list[np.ndarray]:
    """1024-d inputs of `output_proj` for every valid frame of every utterance (same order as `audios`)."""
    from transformers import Gemma4AudioFeatureExtractor

    extractor = Gemma4AudioFeatureExtractor()
    captured: list[torch.Tensor] = []
    handle = model.output_proj.register_forward_hook(lambda mod, inputs, output: captured.append(inputs[0].detach()))
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    result: list[np.ndarray | None] = [None] * len(audios)
    try:
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            feats = extractor([audios[i] for i in idx], sampling_rate=SAMPLE_RATE, return_tensors="pt")
            captured.clear()
            out = model(feats["input_features"], attention_mask=feats["input_features_mask"])
            hidden = captured[0]
            mask = out.attention_mask.bool()
            for row, i in enumerate(idx):
                result[i] = hidden[row][mask[row]].float().numpy()
    finally:
        handle.remove()
    return result  # type: ignore[return-value]


def make_features(num_sentences: int = 360, renditions: int = 6, eval_share: float = 0.3, seed: int = 0,
                  cache: Path = CACHE) -> dict:
    """Train / held-out feature matrices (float32, N x 1024), cached as .npy with a JSON summary."""
    summary_path = cache / "features.json"
    key = dict(num_sentences=num_sentences, renditions=renditions, eval_share=eval_share, seed=seed, version=1)
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("key") == key and (cache / "train.npy").is_file() and (cache / "eval.npy").is_file():
            return dict(train=np.load(cache / "train.npy", mmap_mode="r"), eval=np.load(cache / "eval.npy", mmap_mode="r"),
                        summary=summary)
    from speechless.io import atomic_path, write_json

    t0 = time.perf_counter()
    utts = render_corpus(num_sentences, renditions, seed)
    t_synth = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 2)
    sentence_ids = np.arange(num_sentences)
    rng.shuffle(sentence_ids)
    eval_sentences = set(sentence_ids[: int(round(eval_share * num_sentences))].tolist())
    torch.set_num_threads(os.cpu_count() or 2)
    model = build_encoder(seed)
    t1 = time.perf_counter()
    feats = encode_utterances(model, [u["audio"] for u in utts])
    t_enc = time.perf_counter() - t1
    seconds = sum(len(u["audio"]) for u in utts) / SAMPLE_RATE
    split = {"train": [], "eval": []}
    split_seconds = {"train": 0.0, "eval": 0.0}
    for u, f in zip(utts, feats):
        name = "eval" if u["sentence"] in eval_sentences else "train"
        split[name].append(f)
        split_seconds[name] += len(u["audio"]) / SAMPLE_RATE
    cache.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, parts in split.items():
        arrays[name] = np.concatenate(parts).astype(np.float32)
        with atomic_path(cache / f"{name}.npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, arrays[name])
    summary = dict(
        key=key, utterances=len(utts), audio_seconds=round(seconds, 1),
        train_frames=int(arrays["train"].shape[0]), eval_frames=int(arrays["eval"].shape[0]),
        train_seconds=round(split_seconds["train"], 1), eval_seconds=round(split_seconds["eval"], 1),
        train_sentences=num_sentences - len(eval_sentences), eval_sentences=len(eval_sentences),
        synth_seconds=round(t_synth, 1), encode_seconds=round(t_enc, 1),
        encode_realtime_factor=round(seconds / t_enc, 1), voices=_VOICES,
    )
    write_json(summary_path, summary)
    return dict(train=arrays["train"], eval=arrays["eval"], summary=summary)


# ----------------------------------------------------------------------------------------------------------------------
# Step 2: the study
# ----------------------------------------------------------------------------------------------------------------------

# name -> (description, RVQConfig overrides, init source). Init source: None = vqp handles init itself on the first
# batch; "kmeans:<standardize>" = our residual k-means, fitted once per standardisation and shared between variants.
VARIANTS: dict[str, tuple[str, dict, str | None]] = {
    "a_defaults": ("vqp defaults: ResidualVQ(dim, 8, 2048): random init, decay 0.8, no dead-code, raw input",
                   dict(standardize="none", init="random", decay=0.8, dead_code_threshold=0.0), None),
    "b1_vqpkm_d99": ("vqp kmeans_init (first batch) + dead-code 0.1 x uniform, decay 0.99, raw input",
                     dict(standardize="none", init="vqp_kmeans", decay=0.99, dead_code_threshold=0.1), None),
    "b2_vqpkm_d95": ("vqp kmeans_init + dead-code 0.1 x uniform, decay 0.95, raw input",
                     dict(standardize="none", init="vqp_kmeans", decay=0.95, dead_code_threshold=0.1), None),
    "b3_vqpkm_std": ("vqp kmeans_init + dead-code 0.1, decay 0.99, global standardisation",
                     dict(standardize="global", init="vqp_kmeans", decay=0.99, dead_code_threshold=0.1), None),
    "c0_rkm_only": ("our residual k-means, plain on every level (global std), no fine-tuning",
                    dict(standardize="global", init="residual_kmeans", equal_norm_from_level=None, kmeans_iters=12,
                         finetune=False), "kmeans:plain"),
    "c1_rkm_ema": ("our plain residual k-means (global std) + EMA fine-tune, decay 0.99, dead-code 0.1",
                   dict(standardize="global", init="residual_kmeans", equal_norm_from_level=None, kmeans_iters=12,
                        decay=0.99, dead_code_threshold=0.1), "kmeans:plain"),
    "e1_gainshape": ("our residual k-means, levels 2-8 gain-shape (equal-norm), global std, no fine-tuning",
                     dict(standardize="global", init="residual_kmeans", equal_norm_from_level=1, finetune=False),
                     "kmeans:gainshape1"),
    "e1_gainshape_ema": ("e1 init + EMA fine-tune, decay 0.99, dead-code 0.1",
                         dict(standardize="global", init="residual_kmeans", equal_norm_from_level=1, decay=0.99,
                              dead_code_threshold=0.1), "kmeans:gainshape1"),
    "e0_gainshape_all": ("our residual k-means, ALL levels gain-shape (equal-norm), global std, no fine-tuning",
                         dict(standardize="global", init="residual_kmeans", equal_norm_from_level=0, finetune=False),
                         "kmeans:gainshape0"),
    "d1_rkm_learnable": ("e1 init + learnable codebooks (Adam 1e-3, no EMA), dead-code 0.1",
                         dict(standardize="global", init="residual_kmeans", equal_norm_from_level=1,
                              learnable_codebook=True, learning_rate=1e-3, dead_code_threshold=0.1), "kmeans:gainshape1"),
}


def evaluate(model, x_eval: torch.Tensor) -> dict:
    from speechless.metrics import quantizer_metrics

    model.eval()
    t0 = time.perf_counter()
    codes = model.encode(x_eval)
    t_enc = time.perf_counter() - t0
    x_hat = model.decode(codes)
    out = quantizer_metrics(x_eval, x_hat, codes, model.codebook_size)
    out["encode_vectors_per_s"] = x_eval.shape[0] / t_enc
    return out


def run_variant(name: str, train: torch.Tensor, x_eval: torch.Tensor, steps: int, batch: int, seed: int,
                init_cache: dict) -> dict:
    from speechless.rvq import RVQConfig, SpeechRVQ

    desc, overrides, init_src = VARIANTS[name]
    cfg = RVQConfig(**overrides)
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
    opt = model.optimizer() if cfg.learnable_codebook else None
    model.train()
    log = []
    for step in range(nsteps):
        rows = torch.randint(0, train.shape[0], (batch,), generator=gen)
        out = model.train_step(train[rows], opt)
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
    parser.add_argument("--features-only", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(CACHE / "results.json"))
    parser.add_argument("--save-best", default=str(CACHE / "best"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 2)
    data = make_features()
    print(json.dumps(data["summary"]), flush=True)
    if args.features_only:
        return
    from speechless.io import write_json
    from speechless.rvq import encode_speed

    train = torch.from_numpy(np.ascontiguousarray(data["train"]))
    x_eval = torch.from_numpy(np.ascontiguousarray(data["eval"]))
    out_path = Path(args.out)
    results: list[dict] = []
    if out_path.is_file():
        previous = {r["name"]: r for r in json.loads(out_path.read_text()).get("results", [])}
    else:
        previous = {}
    init_cache: dict = {}
    best = None
    for name in args.variants.split(","):
        if name in previous and previous[name]["steps"] in (0, args.steps) and previous[name]["batch"] == args.batch:
            results.append(previous[name])
            print(f"{name}: cached", flush=True)
            continue
        res, model = run_variant(name, train, x_eval, args.steps, args.batch, args.seed, init_cache)
        results.append(res)
        print(f"{name}: util {[round(u, 3) for u in res['utilization']]} mse {res['mse']:.4f} nmse {res['nmse']:.3f} "
              f"cos {res['cosine']:.4f} ccos {res['centered_cosine']:.3f} train {res['train_seconds']}s", flush=True)
        if min(res["utilization"]) >= 0.95 and (best is None or res["mse"] < best[0]):
            best = (res["mse"], name, model)
        write_json(out_path, dict(machine=machine(), features=data["summary"], steps=args.steps, batch=args.batch,
                                  results=results))
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
                              results=results, encode_speed=speed))
    print(markdown_table(results))
    print(json.dumps(speed, indent=2))


def machine() -> dict:
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
