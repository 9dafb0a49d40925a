"""`make bench-full`: the real-scale configs' models at their published shapes (random weights), checked and timed.

The real configs (configs/stage1/twi_e2b.yaml, configs/stage2/twi_e2b.yaml, configs/stage3/gemma4_e2b_twi.yaml) name
the Gemma 4 audio tower (12 conformer layers, width 1024), a Qwen2.5-0.5B stage-2 backbone and Gemma 4 E2B as the
stage-3 base. Nothing is downloaded: every model is built from a hand-written config of its public shape.

Parts (`--parts`, comma-separated; every part runs at `--scale smoke` in about a minute on CPU, which the test suite does):

counts     parameter counts of the FULL shapes, built on the meta device (no memory) at every scale, against the
           published figures (stated with their source and tolerance), and the analytic formula of the per-layer
           embedding (PLE) tables and the stage-2 backbone against the built modules.
tokenize   feature extraction, audio seconds per wall second: the project's batched path (`encode_windows` +
           `SpeechRVQ.encode`) vs the seed model card's recipe (one clip at a time, a hook on `output_proj`,
           `ResidualVQ.forward`), in fp32; the batched path again with a bf16 encoder, and the share of stage-1 codes
           identical between fp32 and bf16.
encode     RVQ encode vectors/s: `SpeechRVQ.encode` vs `ResidualVQ.forward` vs the measured fp32 matmul roofline
           (8 x 2048 codes on 1024-d at full scale). `SpeechRVQ.encode` runs on the CPU by design (fixed-chunk,
           batch-invariant), whatever `--device` says.
rvq_train  RVQ training vectors/s: `SpeechRVQ.train_step` vs a bare `ResidualVQ` training forward (on `--device`).
stage2     the stage-2 model (`T2SModel`, delay pattern, 8 x 2048 codes, full per-level heads, on the 0.5 B backbone):
           training tokens/s vs the same backbone trained as a plain causal LM on as many positions; greedy generation
           frames/s, batched with the KV cache vs one text at a time (cache) and batched without cache.
stage3     on the Gemma 4 E2B shape (bf16; gradient checkpointing), checks: loss equal with use_cache on and off and
           with gradient checkpointing (transformers#45242 gave KV-shared layers no K/V); depth up-scaling exactly the
           base at init, after EVERY block (KV-shared ones included) and when dropped, one training step; the library's
           speech-only DUS default; LoRA identity at init, one `train_loop` step with gradient checkpointing, adapter
           save and reload. Timing: LoRA training tokens/s, `speechless.core.training.train_loop` vs `transformers.Trainer`
           + peft on the same model, conversations and steps; peak memory (RSS; on CUDA the peak allocated).

Bars (full scale): tokenizing >= 3x the card's recipe; RVQ encode >= 60 % of the roofline; stage-3 LoRA tokens/s
>= 1.3x Trainer + peft; on a GPU, stage 3 on the E2B shape within 40 GB. Checks failing make the exit status 1.

On a CPU with ~24 GB the full E2B (5.1 B parameters, ~10 GB in bf16) does not leave room to train: `--e2b-layers`
(default 10 on CPU, 35 on CUDA) keeps E2B's width, heads, vocabulary, PLE and its sliding/full pattern with fewer
blocks and the same kind of KV sharing; the table says which.

    python benchmarks/full_size.py --scale smoke --out runs/bench/full_size_smoke.json           # ~1 min, CPU
    python benchmarks/full_size.py --scale full --out runs/bench/full_size.json                  # this machine
    python benchmarks/full_size.py --scale full --device cuda --out runs/bench/full_size_cuda.json  # one GPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _measure import alternate, encode_comparison, load_average, machine, residual_vq_from, table, timed

PARTS = ("counts", "tokenize", "encode", "rvq_train", "stage2", "stage3")

# ------------------------------------------------------------------------------------------------ published shapes

AUDIO_FULL: dict = {}
"""Gemma4AudioConfig's defaults ARE the E2B/E4B audio tower (checked against NOTES.md: width 1024, 12 layers, 8 heads,
chunk 12 / left 13 / right 0, logit cap 50, subsampling [128, 32], output_proj 1536)."""


def e2b_text(layers: int = 35, kv_shared: int | None = None) -> dict:
    """Gemma 4 E2B's text config as its public config.json gives it (NOTES.md); `layers` < 35 keeps everything but the
    depth (same 4 sliding : 1 full pattern, KV sharing scaled to keep both layer types among the KV-owning blocks)."""
    if kv_shared is None:
        kv_shared = 20 if layers == 35 else max(1, min(round(layers * 20 / 35), layers - 6))
    return dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=1,
                head_dim=256, global_head_dim=512, sliding_window=512,
                layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)],
                num_kv_shared_layers=kv_shared, hidden_size_per_layer_input=256, vocab_size=262_144,
                vocab_size_per_layer_input=262_144, final_logit_softcapping=30.0, use_double_wide_mlp=True,
                max_position_embeddings=131_072)


QWEN25_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=32_768,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu")
"""Qwen2.5-0.5B's public shape (configs/stage2/twi_e2b.yaml names Qwen/Qwen2.5-0.5B)."""

PUBLISHED = {  # name: (figure, relative tolerance, source)
    "audio_tower": (304.8e6, 0.005, "NOTES.md: Gemma 4 audio tower 304.8 M"),
    "e2b_total": (5.1e9, 0.03, "Gemma 4 E2B model card: 5.1 B with per-layer embeddings"),
    "e2b_effective": (2.3e9, 0.05, "Gemma 4 E2B model card: 2.3 B effective = the text stack without its PLE tables"),
    "stage2_backbone": (0.49e9, 0.02, "Qwen2.5-0.5B model card: 0.49 B"),
    "stage2_backbone_non_embedding": (0.36e9, 0.02, "Qwen2.5-0.5B model card: 0.36 B non-embedding"),
}

WORDS = ("mama anasoma barua shuleni kesho watoto walichora picha darasani juzi mwalimu alikula wali nyumbani asubuhi "
         "ɛnnɛ ɔkwan yɛ akwadaa no kɔ sukuu na ɔbaa no tɔn nneɛma wɔ dwam hɔ").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


# ------------------------------------------------------------------------------------------------------- scales

SCALES = {
    "smoke": dict(
        audio=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[128, 8], output_proj_dims=48),
        clips_s=[1.0, 1.6, 2.2, 3.1], encoder_batch=2, rvq=(2, 64), rvq_init=1024, kmeans_iters=2, encode_vectors=2048,
        train_batch=1024, train_steps=2, rounds=1, tokenize_rounds=1,
        t2s=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=4096),
        t2s_levels=(2, 64), t2s_batch=2, t2s_frames=20, t2s_words=(4, 8), t2s_steps=2, gen_texts=3, gen_frames=8,
        e2b=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 global_head_dim=64, sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                                     "sliding_attention", "full_attention"],
                 num_kv_shared_layers=2, hidden_size_per_layer_input=16, vocab_size=512, vocab_size_per_layer_input=512,
                 final_logit_softcapping=30.0, use_double_wide_mlp=True, max_position_embeddings=4096),
        s3_dtype="float32", conversations=8, s3_batch=4, s3_steps=2, s3_frames=(6, 20), s3_words=(3, 8), lora=(8, 16.0)),
    "full": dict(
        # 16 clips = 2 full encoder batches, each of one 2-s length bucket, as nearly every batch of a large corpus is
        audio=AUDIO_FULL, clips_s=[2.1 + 0.25 * i for i in range(8)] + [4.1 + 0.25 * i for i in range(8)], encoder_batch=8,
        rvq=(8, 2048), rvq_init=16384,
        kmeans_iters=2, encode_vectors=16384, train_batch=8192, train_steps=2, rounds=2, tokenize_rounds=1,
        t2s=QWEN25_05B, t2s_levels=(8, 2048), t2s_batch=2, t2s_frames=125, t2s_words=(8, 14), t2s_steps=2, gen_texts=4, gen_frames=25,
        e2b=None, s3_dtype="bfloat16", conversations=16, s3_batch=4, s3_steps=4, s3_frames=(25, 150), s3_words=(8, 20),
        lora=(32, 64.0)),  # rank/alpha of configs/stage3/gemma4_e2b_twi.yaml
}


# ------------------------------------------------------------------------------------------------------ helpers

class Report:
    def __init__(self, args):
        self.data = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "scale": args.scale,
                     "device": args.device, "argv": sys.argv[1:], "parts": {}, "rows": [], "checks": [], "load_average": {}}

    def row(self, part: str, measure: str, ours, anchor="", ratio=None, bar: str = "", met: bool | None = None) -> None:
        self.data["rows"].append({"part": part, "measure": measure, "ours": ours, "anchor": anchor,
                                  "ratio": None if ratio is None else round(ratio, 3), "bar": bar, "met": met})

    def check(self, part: str, name: str, passed: bool, detail: str) -> None:
        self.data["checks"].append({"part": part, "check": name, "passed": bool(passed), "detail": detail})
        print(f"  check {'PASS' if passed else 'FAIL'}: {part}: {name} ({detail})", flush=True)


def rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count(module: torch.nn.Module) -> int:
    from speechless.t2s.backbone import count_parameters

    return count_parameters(module)


def within(value: float, name: str) -> tuple[bool, str]:
    figure, tol, source = PUBLISHED[name]
    return abs(value / figure - 1) <= tol, f"{value / 1e6:,.1f} M vs {figure / 1e6:,.1f} M published (+-{tol:.1%}; {source})"


def qwen2_formula(c: dict) -> dict:
    """Qwen2 parameters from its config: embeddings (tied head), per layer q/k/v (with bias) + o + gated MLP + 2 norms."""
    h, layers, heads, kv, inter, vocab = (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
                                          c["intermediate_size"], c["vocab_size"])
    hd = h // heads
    attention = h * heads * hd + heads * hd + 2 * (h * kv * hd + kv * hd) + heads * hd * h
    layer = attention + 3 * h * inter + 2 * h
    embedding = vocab * h
    return {"total": embedding + layers * layer + h + (0 if c.get("tie_word_embeddings") else vocab * h), "embedding": embedding}


def random_audio(seconds: list[float], seed: int = 0) -> list[np.ndarray]:
    """Speech-like test signals: a few drifting harmonics with an amplitude envelope, plus noise (16 kHz)."""
    rng = np.random.default_rng(seed)
    clips = []
    for s in seconds:
        t = np.arange(int(16000 * s)) / 16000
        f0 = 110 + 60 * np.sin(2 * np.pi * rng.uniform(0.2, 0.8) * t)
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        voice = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
        clips.append((0.1 * voice + 0.01 * rng.standard_normal(len(t))).astype(np.float32))
    return clips


# --------------------------------------------------------------------------------------------------------- counts

def part_counts(args, S, rep: Report) -> None:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Gemma4AudioConfig,
        Gemma4AudioModel,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    out = {}
    with torch.device("meta"):
        audio = count(Gemma4AudioModel(Gemma4AudioConfig(**AUDIO_FULL)))
        text_cfg = e2b_text()
        e2b = Gemma4ForConditionalGeneration(Gemma4Config(text_config=Gemma4TextConfig(**text_cfg).to_dict(),
                                                          audio_config=Gemma4AudioConfig(**AUDIO_FULL).to_dict(),
                                                          vision_config=Gemma4VisionConfig().to_dict()))
        q = dict(QWEN25_05B)
        qwen = AutoModelForCausalLM.from_config(AutoConfig.for_model(q.pop("model_type"), **q))
    inner = e2b.model
    parts = {name: count(getattr(inner, name)) for name in ("language_model", "audio_tower", "vision_tower", "embed_audio", "embed_vision")
             if getattr(inner, name, None) is not None}
    total = count(e2b)
    ple = count(inner.language_model.embed_tokens_per_layer)
    ple_formula = text_cfg["vocab_size_per_layer_input"] * text_cfg["num_hidden_layers"] * text_cfg["hidden_size_per_layer_input"]
    kv_shared = [i for i, layer in enumerate(inner.language_model.layers) if layer.self_attn.is_kv_shared_layer]
    out["audio_tower"] = audio
    out["e2b"] = {"total": total, "without_ple": total - ple, "ple_tables": ple, "components": parts,
                  "text_without_ple": parts["language_model"] - ple, "kv_shared_layers": [kv_shared[0], kv_shared[-1]],
                  "vision_tower_note": "transformers' default Gemma4VisionConfig (E2B's vision tower assumed to match)"}
    qwen_count = count(qwen)
    formula = qwen2_formula(QWEN25_05B)
    out["stage2_backbone"] = {"total": qwen_count, "non_embedding": qwen_count - formula["embedding"], "formula": formula["total"]}
    rep.data["parts"]["counts"] = out
    ok, detail = within(audio, "audio_tower")
    rep.check("counts", "audio tower (Gemma4AudioConfig defaults)", ok, detail)
    rep.row("counts", "audio tower parameters", f"{audio / 1e6:.1f} M", "304.8 M", audio / 304.8e6, "+-0.5 %", ok)
    ok, detail = within(total, "e2b_total")
    rep.check("counts", "E2B total with PLE tables (text + audio + vision towers; vision: transformers' default Gemma4VisionConfig)", ok, detail)
    rep.row("counts", "E2B parameters with PLE", f"{total / 1e9:.3f} B", "5.1 B", total / 5.1e9, "+-3 %", ok)
    effective = parts["language_model"] - ple
    ok, detail = within(effective, "e2b_effective")
    rep.check("counts", "E2B text stack without PLE tables ('effective')", ok, detail)
    rep.row("counts", "E2B text stack without PLE ('effective')", f"{effective / 1e9:.3f} B", "2.3 B", effective / 2.3e9, "+-5 %", ok)
    rep.row("counts", "E2B all towers without PLE (not a published figure)", f"{(total - ple) / 1e9:.3f} B")
    rep.check("counts", "PLE tables = vocab x layers x 256", ple == ple_formula, f"{ple:,} built vs {ple_formula:,} formula")
    rep.check("counts", "E2B KV-shared layers 15..34", kv_shared == list(range(15, 35)), f"{kv_shared[0]}..{kv_shared[-1]}")
    ok, detail = within(qwen_count, "stage2_backbone")
    rep.check("counts", "stage-2 backbone (Qwen2.5-0.5B shape)", ok and qwen_count == formula["total"],
              f"{detail}; formula {formula['total']:,} vs built {qwen_count:,}")
    rep.row("counts", "stage-2 backbone parameters", f"{qwen_count / 1e6:.1f} M", "0.49 B", qwen_count / 0.49e9, "+-2 %", ok)
    ok, detail = within(qwen_count - formula["embedding"], "stage2_backbone_non_embedding")
    rep.check("counts", "stage-2 backbone without embeddings", ok, detail)
    # the reduced shapes this run builds obey the same formulas
    if S["t2s"] is not QWEN25_05B:
        c = dict(S["t2s"])
        with torch.device("meta"):
            small = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
        rep.check("counts", "stage-2 backbone formula at this scale", count(small) == qwen2_formula(S["t2s"])["total"],
                  f"{count(small):,} built vs {qwen2_formula(S['t2s'])['total']:,} formula")
    print(f"counts: audio {audio:,}; E2B {total:,} ({total - ple:,} without PLE {ple:,}); qwen {qwen_count:,}", flush=True)


# ------------------------------------------------------------------------------------------------- RVQ (shared)

_RVQ: dict = {}


def stage1_rvq(S, dim: int, mean: float = 0.0, std: float = 1.0):
    """The stage-1 quantizer at this scale (8 x 2048 on 1024-d at full): residual k-means on random vectors with the
    encoder's mean/std, built once per run (CPU: SpeechRVQ.encode is CPU-only)."""
    from speechless.speech.rvq import RVQConfig, SpeechRVQ

    if dim not in _RVQ:
        q, k = S["rvq"]
        rvq = SpeechRVQ(RVQConfig(num_quantizers=q, codebook_size=k, kmeans_iters=S["kmeans_iters"]), dim)
        x = torch.randn(S["rvq_init"], dim, generator=torch.Generator().manual_seed(0)) * std + mean
        started = time.perf_counter()
        rvq.initialize(x, seed=0)
        print(f"rvq: {q} x {k} on {dim}-d initialised from {len(x)} vectors in {time.perf_counter() - started:.1f} s", flush=True)
        _RVQ[dim] = rvq.eval()
    return _RVQ[dim]


def audio_config_file(S, folder: Path) -> Path:
    path = folder / "audio.json"
    path.write_text(json.dumps({"model_type": "gemma4_audio", **S["audio"]}))
    return path


# ------------------------------------------------------------------------------------------------------ tokenize

def part_tokenize(args, S, rep: Report) -> None:
    from speechless.data.audio import SAMPLE_RATE
    from speechless.speech.encoders import AudioWindow, EncoderConfig, encode_windows, load_encoder

    clips = random_audio(S["clips_s"])
    audio_s = sum(len(c) for c in clips) / SAMPLE_RATE
    windows = [AudioWindow((i, 0), c) for i, c in enumerate(clips)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg32 = EncoderConfig(source=str(audio_config_file(S, Path(tmp))), device=args.device, dtype="float32",
                              batch_size=S["encoder_batch"], length_bucket_s=2.0)
        enc32 = load_encoder(cfg32)
        parameters = count(enc32.model)
        warm = dict(encode_windows(enc32, windows[: S["encoder_batch"]], cfg32))  # warm-up; the vectors' scale sizes the codebooks
        flat = torch.cat(list(warm.values()))
        rvq = stage1_rvq(S, enc32.dim, float(flat.mean()), float(flat.std()))
        plain = residual_vq_from(rvq)

        def ours(encoder, cfg):
            vectors = dict(encode_windows(encoder, windows, cfg))
            return [rvq.encode(vectors[(i, 0)]) for i in range(len(clips))]

        def card(clips=clips):
            encoder = enc32
            captured: list = []
            hook = encoder.model.get_submodule(cfg32.hook_module).register_forward_hook(lambda _m, i, _o: captured.append(i[0]))
            codes = []
            try:
                for samples in clips:
                    features = encoder.feature_extractor([samples], sampling_rate=SAMPLE_RATE, return_tensors="pt")
                    captured.clear()
                    with torch.no_grad():
                        output = encoder.model(features["input_features"].to(encoder.device, encoder.dtype),
                                               attention_mask=features["input_features_mask"].to(encoder.device))
                        vectors = captured[0][0][output.attention_mask[0]].float().cpu()
                        _, indices, _ = plain(rvq.standardize(vectors).unsqueeze(0))
                    codes.append(indices[0])
            finally:
                hook.remove()
            return codes

        card(clips[:1])
        runs = alternate({"ours": partial(ours, enc32, cfg32), "card": card}, S["tokenize_rounds"])
        (codes32, o32), (codes_card, c32) = runs["ours"], runs["card"]
        enc32 = None  # frees the fp32 encoder before the next part
        free()
        cfg16 = cfg32.model_copy(update={"dtype": "bfloat16"})
        enc16 = load_encoder(cfg16)
        dict(encode_windows(enc16, windows[: S["encoder_batch"]], cfg16))  # warm-up
        codes16, o16 = alternate({"bf16": partial(ours, enc16, cfg16)}, S["tokenize_rounds"])["bf16"]
        del enc16
        free()
    frames = sum(len(c) for c in codes32)
    same_rows = sum(int((a == b).all(1).sum()) for a, b in zip(codes32, codes16) if a.shape == b.shape)
    same_l0 = sum(int((a[:, 0] == b[:, 0]).sum()) for a, b in zip(codes32, codes16) if a.shape == b.shape)
    same_card = sum(int((a == b).all(1).sum()) for a, b in zip(codes32, codes_card) if a.shape == b.shape)
    rate = {name: audio_s / stats["seconds"] for name, stats in (("ours", o32), ("card", c32), ("bf16", o16))}
    result = {"clips": len(clips), "audio_seconds": round(audio_s, 2), "frames": frames, "encoder_parameters": parameters,
              "encoder_batch": S["encoder_batch"], "device": args.device,
              "ours_fp32": {**o32, "audio_s_per_s": round(rate["ours"], 2)}, "card_fp32": {**c32, "audio_s_per_s": round(rate["card"], 2)},
              "ours_bf16": {**o16, "audio_s_per_s": round(rate["bf16"], 2)}, "speedup_vs_card": round(rate["ours"] / rate["card"], 3),
              "bf16_vs_fp32": round(rate["bf16"] / rate["ours"], 3), "identical_frames_bf16_vs_fp32": round(same_rows / max(frames, 1), 4),
              "identical_level0_bf16_vs_fp32": round(same_l0 / max(frames, 1), 4),
              "identical_frames_ours_vs_card": round(same_card / max(frames, 1), 4)}
    rep.data["parts"]["tokenize"] = result
    rep.row("tokenize", f"audio s/s, fp32, {parameters / 1e6:.1f} M encoder, {len(clips)} clips {audio_s:.0f} s: batched vs card one-clip",
            round(rate["ours"], 2), round(rate["card"], 2), rate["ours"] / rate["card"], ">= 3x", rate["ours"] / rate["card"] >= 3)
    rep.row("tokenize", "audio s/s, bf16 encoder vs fp32 (batched)", round(rate["bf16"], 2), round(rate["ours"], 2), rate["bf16"] / rate["ours"])
    rep.row("tokenize", "stage-1 codes identical bf16 vs fp32 (all levels / level 0)",
            f"{same_rows / max(frames, 1):.1%} / {same_l0 / max(frames, 1):.1%} of {frames} frames")
    rep.row("tokenize", "stage-1 codes identical, batched vs card (fp32)", f"{same_card / max(frames, 1):.1%}")
    rep.check("tokenize", "every clip gives codes on both paths", len(codes32) == len(codes_card) == len(clips) and frames > 0, f"{frames} frames")


# -------------------------------------------------------------------------------------------------------- encode

def part_encode(args, S, rep: Report) -> None:
    dim = 1024 if S["audio"] is AUDIO_FULL else S["audio"]["hidden_size"]
    rvq = stage1_rvq(S, dim)
    x = torch.randn(S["encode_vectors"], dim, generator=torch.Generator().manual_seed(1)) * rvq.std + rvq.mean
    result = encode_comparison(rvq, x, S["rounds"])
    rate = {k: result[k]["vectors_per_s"] for k in ("ours", "residualvq", "roofline")}
    identical = result["identical_rows"]
    rep.data["parts"]["encode"] = {**result, "shape": f"{rvq.num_quantizers} x {rvq.codebook_size} x {dim}", "device": "cpu",
                                   "identical_rows": round(identical, 4)}
    shape = f"{rvq.num_quantizers} x {rvq.codebook_size} x {dim}"
    rep.row("encode", f"RVQ encode vectors/s ({shape}, CPU) vs fp32 matmul roofline", round(rate["ours"]), round(rate["roofline"]),
            rate["ours"] / rate["roofline"], ">= 60 %", rate["ours"] / rate["roofline"] >= 0.6)
    rep.row("encode", "RVQ encode vectors/s vs `ResidualVQ.forward`", round(rate["ours"]), round(rate["residualvq"]),
            rate["ours"] / rate["residualvq"])
    rep.check("encode", "codes equal ResidualVQ's (up to float near-ties)", identical >= 0.99, f"{identical:.2%} of rows identical")


# ----------------------------------------------------------------------------------------------------- rvq_train

def part_rvq_train(args, S, rep: Report) -> None:
    device = torch.device(args.device)
    dim = 1024 if S["audio"] is AUDIO_FULL else S["audio"]["hidden_size"]
    rvq = copy.deepcopy(stage1_rvq(S, dim)).to(device)
    plain = residual_vq_from(rvq).train().to(device)
    for layer in plain.layers:
        layer._codebook.threshold_ema_dead_code = rvq.cfg.dead_code_threshold * S["train_batch"] / rvq.codebook_size
    x = (torch.randn(S["train_batch"], dim, generator=torch.Generator().manual_seed(2)) * rvq.std.cpu() + rvq.mean.cpu()).to(device)
    z = rvq.standardize(x).unsqueeze(0)
    steps = S["train_steps"]

    def ours():
        for _ in range(steps):
            out = rvq.train_step(x)
        sync(device)
        return out

    def bare():
        with torch.no_grad():
            for _ in range(steps):
                plain(z)
        sync(device)

    rvq.train_step(x)
    with torch.no_grad():
        plain(z)
    runs = alternate({"ours": ours, "bare": bare}, S["rounds"])
    (last, o), (_, b) = runs["ours"], runs["bare"]
    n = steps * S["train_batch"]
    rep.data["parts"]["rvq_train"] = {"batch": S["train_batch"], "steps": steps, "device": args.device,
                                      "ours": {**o, "vectors_per_s": round(n / o["seconds"])},
                                      "bare_residualvq": {**b, "vectors_per_s": round(n / b["seconds"])}, "last_step": last}
    rep.row("rvq_train", f"RVQ training vectors/s (batch {S['train_batch']}, {args.device}) vs bare ResidualVQ training forward",
            round(n / o["seconds"]), round(n / b["seconds"]), b["seconds"] / o["seconds"])
    rep.check("rvq_train", "training step finite", math.isfinite(last["loss"]), f"loss {last['loss']:.4f}")


# -------------------------------------------------------------------------------------------------------- stage 2

def part_stage2(args, S, rep: Report) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from speechless.t2s.autoregressive import AutoregressiveT2S
    from speechless.t2s.config import T2SConfig
    from speechless.t2s.frames import collate
    from speechless.t2s.text import TextEncoder, normalize_text, train_text_tokenizer

    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None  # stage 2's precision: auto
    rng = random.Random(0)
    texts = [sentence(rng, *S["t2s_words"]) for _ in range(64)]
    tokenizer = train_text_tokenizer(texts, 96)
    text = TextEncoder(tokenizer, "".join(sorted({ch for t in texts for ch in normalize_text(t)} - {" "})), 256)
    c = dict(S["t2s"])
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
    q, k = S["t2s_levels"]
    cfg = T2SConfig(backbone="hand-written Qwen2.5-0.5B shape" if S["t2s"] is QWEN25_05B else "smoke backbone", head_rank=None,
                    frame_mode="delay", speaker_embedding=True, dropout=0.1, max_text_tokens=256)
    model = AutoregressiveT2S(cfg, backbone, text, q, k, ["speaker0", "speaker1"], {"revision": "random", "ref": "none"}).to(device)
    backbone_params, total_params = count(model.lm), count(model)
    g = torch.Generator().manual_seed(0)
    batch_size, frames = S["t2s_batch"], S["t2s_frames"]
    items = [(text.encode(texts[i]).chunks[0], torch.randint(0, k, (q, frames), generator=g), i % 2) for i in range(batch_size)]
    batch = collate(items, model.delays, k).to(device)
    positions = int(batch.text_mask.sum() + batch.audio_mask.sum())
    steps = S["t2s_steps"]

    def ours_steps(optimizer, n_steps: int):
        model.train()
        for _ in range(n_steps):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = model.loss(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        sync(device)
        return float(loss.detach())

    # the anchor: the same backbone trained as a plain causal LM on as many positions (its own 151,936-way head)
    lm_ids = torch.randint(0, S["t2s"]["vocab_size"], (batch_size, positions // batch_size), generator=g).to(device)

    def plain_steps(optimizer, n_steps: int):
        model.lm.train()
        for _ in range(n_steps):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = model.lm(input_ids=lm_ids, labels=lm_ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.lm.parameters(), 1.0)
            optimizer.step()
        sync(device)
        return float(loss.detach())

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), weight_decay=0.05)
    ours_steps(optimizer, 1)  # warm-up (and the optimizer's state)
    loss, o = timed(partial(ours_steps, optimizer, steps))
    del optimizer
    model.zero_grad(set_to_none=True)
    free()
    optimizer = torch.optim.AdamW(model.lm.parameters(), lr=3e-4, betas=(0.9, 0.98), weight_decay=0.05)
    plain_steps(optimizer, 1)
    plain_loss, p = timed(partial(plain_steps, optimizer, steps))
    del optimizer
    model.zero_grad(set_to_none=True)
    free()
    train_tokens = steps * positions
    ours_rate, plain_rate = train_tokens / o["seconds"], train_tokens / p["seconds"]

    # generation: greedy, every text exactly gen_frames frames (min_frames = max_frames: random weights may stop early)
    model.eval()
    ids = [text.encode(t).chunks[0] for t in texts[: S["gen_texts"]]]
    n_gen = S["gen_frames"]

    def generate(batch_rows: int, cache: bool):
        out = []
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for start in range(0, len(ids), batch_rows):
                codes, _ = model.generate(ids[start:start + batch_rows], max_frames=n_gen, min_frames=n_gen, use_cache=cache)
                out.extend(codes)
        sync(device)
        return out

    generate(len(ids), True)
    runs = alternate({"batched_cache": partial(generate, len(ids), True), "one_cache": partial(generate, 1, True),
                      "batched_recompute": partial(generate, len(ids), False)}, 1)
    frames_out = sum(c.shape[1] for c in runs["batched_cache"][0])
    rates = {name: frames_out / stats["seconds"] for name, (_, stats) in runs.items()}
    same = all(torch.equal(a, b) for name in ("one_cache", "batched_recompute") for a, b in zip(runs["batched_cache"][0], runs[name][0]))
    rep.data["parts"]["stage2"] = {
        "backbone_parameters": backbone_params, "model_parameters": total_params, "levels": q, "codebook": k, "device": args.device,
        "amp": str(amp), "batch": batch_size, "frames": frames, "positions_per_step": positions, "steps": steps,
        "ours": {**o, "tokens_per_s": round(ours_rate, 1), "loss": loss}, "plain_lm": {**p, "tokens_per_s": round(plain_rate, 1), "loss": plain_loss},
        "generate": {name: {**stats, "frames_per_s": round(rates[name], 2)} for name, (_, stats) in runs.items()},
        "generated_frames": frames_out, "texts": len(ids), "identical_outputs": same}
    rep.row("stage2", f"training tokens/s ({total_params / 1e6:.0f} M T2SModel, {q}x{k} full heads, batch {batch_size} x {positions // batch_size} "
            f"positions) vs the backbone as a plain causal LM", round(ours_rate, 1), round(plain_rate, 1), ours_rate / plain_rate)
    rep.row("stage2", f"generation frames/s, batch {len(ids)} + KV cache vs one text at a time + cache", round(rates["batched_cache"], 2),
            round(rates["one_cache"], 2), rates["batched_cache"] / rates["one_cache"])
    rep.row("stage2", f"generation frames/s, batch {len(ids)} + KV cache vs batched recompute", round(rates["batched_cache"], 2),
            round(rates["batched_recompute"], 2), rates["batched_cache"] / rates["batched_recompute"])
    rep.check("stage2", "training losses finite", math.isfinite(loss) and math.isfinite(plain_loss), f"{loss:.3f} / {plain_loss:.3f}")
    rep.check("stage2", "generation: same codes batched/one-at-a-time/recompute", same, f"{frames_out} frames")
    model = backbone = None  # frees them before the next part
    free()


# -------------------------------------------------------------------------------------------------------- stage 3

def build_gemma4(text_cfg: dict, audio_cfg: dict, tokenizer, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Gemma4ForConditionalGeneration of the given shapes with random weights, special ids from `tokenizer`, built
    directly in `dtype` on `device` (the full E2B in fp32 would need 20 GB first)."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           dict(pad=tokenizer.pad_token, eos=tokenizer.eos_token, bos=tokenizer.bos_token, audio="<|audio|>", boa="<|audio>",
                eoa="<audio|>", image="<|image|>", boi="<|image>", eoi="<image|>", video="<|video|>").items()}
    text = dict(text_cfg, pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"])
    config = Gemma4Config(text_config=Gemma4TextConfig(**text).to_dict(), audio_config=Gemma4AudioConfig(**audio_cfg).to_dict(),
                          vision_config=None, audio_token_id=ids["audio"], boa_token_id=ids["boa"], eoa_token_index=ids["eoa"],
                          image_token_id=ids["image"], boi_token_id=ids["boi"], eoi_token_id=ids["eoi"], video_token_id=ids["video"])
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Gemma4ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


class LossOf(torch.nn.Module):
    """What Trainer trains, on the batch dict `SpeechLM.batch` collates. `standard`: the loss as a Trainer + peft user gets
    it from transformers (logits at every position, the model's own causal-LM loss over the labelled ones); otherwise
    `SpeechLM.loss` (logits only where a label is predicted), which isolates what the training loop itself adds."""

    accepts_loss_kwargs = False

    def __init__(self, speech_lm, standard: bool):
        super().__init__()
        self.speech_lm, self.standard = speech_lm, standard

    def forward(self, **batch):
        if not self.standard:
            return {"loss": self.speech_lm.loss(batch)}
        logits = self.speech_lm.logits(batch).logits
        lm = self.speech_lm.lm
        return {"loss": lm.loss_function(logits=logits, labels=batch["labels"].to(logits.device), vocab_size=logits.shape[-1])}


def part_stage3(args, S, rep: Report) -> None:
    from speechless.core.io import load_tensors
    from speechless.core.training import length_batches as epoch_batches
    from speechless.llm.adapt import train_loop
    from speechless.llm.adapters import AdapterConfig, decoder_layers, remove_dus
    from speechless.llm.base import BaseConfig, build_demo_tokenizer
    from speechless.llm.model import SpeechLM
    from speechless.speech.encoders import EncoderConfig

    device = torch.device(args.device)
    dtype_name = args.stage3_dtype or S["s3_dtype"]
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    if S["e2b"] is None:
        layers = args.e2b_layers or (35 if device.type == "cuda" else 10)
        text_cfg = e2b_text(layers)
    else:
        text_cfg = S["e2b"]
    layers = text_cfg["num_hidden_layers"]
    shape = (f"E2B shape, {layers} of 35 layers, {text_cfg['num_kv_shared_layers']} KV-shared" if S["e2b"] is None and layers != 35
             else "E2B shape (35 layers, 20 KV-shared)" if S["e2b"] is None else f"smoke Gemma 4 ({layers} layers, {text_cfg['num_kv_shared_layers']} KV-shared)")
    conversations = args.stage3_conversations or S["conversations"]
    frame_range = (min(S["s3_frames"][0], args.stage3_max_frames), args.stage3_max_frames) if args.stage3_max_frames else S["s3_frames"]
    rng = random.Random(0)
    rows = [(sentence(rng, *S["s3_words"]), rng.randint(*frame_range)) for _ in range(conversations)]
    prompts = ["Transcribe the audio.\n", "Translate the audio into English.\n", "Where is the speaker?\n"]
    tokenizer = build_demo_tokenizer([r[0] for r in rows] * 4 + prompts * 4 + [" ".join(WORDS)] * 4, 400)
    if text_cfg["vocab_size"] < len(tokenizer):
        raise SystemExit(f"stage3: tokenizer has {len(tokenizer)} tokens, model vocab {text_cfg['vocab_size']}")
    started = time.perf_counter()
    model = build_gemma4(text_cfg, S["audio"], tokenizer, dtype, device)
    built_s = time.perf_counter() - started
    dim = model.model.audio_tower.output_proj.in_features
    base_cfg = BaseConfig(kind="gemma4_audio", source=shape, dtype=dtype_name, device=args.device)
    encoder_cfg = EncoderConfig(source="(the base's own audio tower)", device=args.device)
    sha = "not computed (random weights)"
    params = count(model)
    print(f"stage3: {shape}: {params:,} parameters in {dtype}, built in {built_s:.1f} s; peak RSS {rss_gib()} GiB", flush=True)
    g = torch.Generator().manual_seed(0)

    def conversation(i: int):
        words, _ = rows[i]
        return [{"role": "user", "content": [{"type": "text", "text": prompts[i % len(prompts)]}, {"type": "speech", "text": "x"}]},
                {"role": "assistant", "content": words}]

    vectors = [torch.randn(frames, dim, generator=g) for _, frames in rows]
    speech_lm = SpeechLM(model, tokenizer, base_cfg, sha, encoder_cfg)
    raw = [speech_lm.encode(conversation(i), [vectors[i]]) for i in range(len(rows))]
    probe = speech_lm.batch(raw[:2])
    result: dict = {"shape": shape, "conversations": conversations, "audio_frames_range": list(frame_range), "text_config": {k: v for k, v in text_cfg.items() if k != "layer_types"}, "parameters": params,
                    "dtype": str(dtype), "device": args.device, "build_seconds": round(built_s, 1)}

    def logits(lm: SpeechLM, use_cache: bool = False) -> torch.Tensor:
        with torch.no_grad():
            return lm.logits(probe, use_cache=use_cache).logits.float()

    def loss_of(lm: SpeechLM, use_cache: bool) -> float:
        out = logits(lm, use_cache)
        labels = probe["labels"].to(out.device)
        return float(torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100))

    # use_cache on/off, gradient checkpointing on/off (transformers#45242: KV-shared layers got no K/V)
    base = logits(speech_lm)
    with_cache, without = loss_of(speech_lm, True), loss_of(speech_lm, False)
    model.activation_checkpointing_enable()
    speech_lm.train()
    with torch.no_grad():
        ckpt = float(speech_lm.loss(probe))
    speech_lm.eval()
    model.activation_checkpointing_disable()
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    result["loss_use_cache"], result["loss_no_cache"], result["loss_grad_ckpt"] = with_cache, without, ckpt
    rep.check("stage3", f"loss equal with use_cache on and off ({shape})", abs(with_cache - without) <= tol * max(1, abs(without)),
              f"{with_cache:.6f} vs {without:.6f}")
    rep.check("stage3", "loss equal with gradient checkpointing (train mode) and without", abs(ckpt - without) <= tol * max(1, abs(without)),
              f"{ckpt:.6f} vs {without:.6f}")
    rep.check("stage3", "random-init loss near ln(vocab) (K/V reach the shared layers)", abs(without - math.log(text_cfg["vocab_size"])) < 3,
              f"{without:.3f} vs ln {text_cfg['vocab_size']} = {math.log(text_cfg['vocab_size']):.3f}")

    # DUS after EVERY block, KV-shared ones included (all positions), then one step, then dropped
    dus = SpeechLM(model, tokenizer, base_cfg, sha, encoder_cfg)
    dus.attach(AdapterConfig(kind="dus", dus_blocks=layers, dus_after=list(range(layers)), speech_only=False))
    diff = float((logits(dus) - base).abs().max())
    rep.check("stage3", f"DUS after all {layers} blocks (incl. KV-shared) is the base at init", diff == 0.0, f"max |dlogit| {diff}")
    model.activation_checkpointing_enable()
    dus.train()
    loss = dus.loss(speech_lm.batch(raw[: S["s3_batch"]]))
    loss.backward()
    news = [layer.new for layer in decoder_layers(model) if hasattr(layer, "new")]
    got = sum(int(blk.self_attn.o_proj.weight.grad is not None and bool(blk.self_attn.o_proj.weight.grad.abs().sum() > 0)) for blk in news)
    with torch.no_grad():  # one plain SGD step (no optimizer state: the DUS copies of every block are big at full scale)
        for p in dus.trainable_parameters().values():
            if p.grad is not None:
                p.add_(p.grad, alpha=-1e-2)
    dus.zero_grad(set_to_none=True)
    dus.eval()
    model.activation_checkpointing_disable()
    moved = float((logits(dus) - base).abs().max())
    rep.check("stage3", "DUS one step with gradient checkpointing: every new block (KV-shared ones too) gets gradient",
              math.isfinite(float(loss)) and got == layers and moved > 0, f"loss {float(loss):.4f}, {got}/{layers} blocks, max |dlogit| after {moved:.3g}")
    remove_dus(model)
    diff = float((logits(speech_lm) - base).abs().max())
    rep.check("stage3", "DUS dropped: the base again", diff == 0.0, f"max |dlogit| {diff}")
    del dus, news
    free()
    default = SpeechLM(model, tokenizer, base_cfg, sha, encoder_cfg)
    default.attach(AdapterConfig(kind="dus", dus_blocks=2))
    shared_from = layers - text_cfg["num_kv_shared_layers"]
    diff = float((logits(default) - base).abs().max())
    rep.check("stage3", "speech-only DUS default placement: the base at init, and a KV-owning block follows each new block",
              diff == 0.0 and all(i < shared_from - 1 for i in default.dus_after), f"after {default.dus_after}, max |dlogit| {diff}")
    result["dus_default_after"] = default.dus_after
    remove_dus(model)
    del default
    free()

    # LoRA (speech-only, the real config's rank/alpha): identity, one train_loop step with gradient checkpointing, save/reload
    lora = SpeechLM(model, tokenizer, base_cfg, sha, encoder_cfg)
    rank, alpha = S["lora"]
    lora.attach(AdapterConfig(kind="lora", lora_rank=rank, lora_alpha=alpha))
    counts = lora.parameter_counts()
    result["lora"] = {"rank": rank, "alpha": alpha, **counts}
    diff = float((logits(lora) - base).abs().max())
    rep.check("stage3", f"LoRA r{rank} is the base at init", diff == 0.0, f"max |dlogit| {diff}")
    embedded = lora.embed_audio_once(raw)
    with tempfile.TemporaryDirectory() as tmp:
        history = train_loop(lora, embedded[: S["s3_batch"]], 1, S["s3_batch"], 1e-3, 1, Path(tmp) / "step", "check", 0, 1, "check",
                             gradient_checkpointing=True)
    b_norm = sum(float(p.float().abs().sum()) for n, p in lora.trainable_parameters().items() if "lora_B" in n)
    rep.check("stage3", "LoRA one train_loop step with gradient checkpointing moves the adapter",
              b_norm > 0 and math.isfinite(history[-1]["loss"]), f"loss {history[-1]['loss']}, sum |lora_B| {b_norm:.3g}")
    trained = logits(lora)
    with tempfile.TemporaryDirectory() as tmp:
        lora.save_adapter(Path(tmp), {"benchmark": "full_size"})
        size = (Path(tmp) / "adapter.safetensors").stat().st_size
        with torch.no_grad():
            for p in lora.trainable_parameters().values():
                p.zero_()
        zeroed = float((logits(lora) - trained).abs().max())
        lora.load_adapter_tensors(load_tensors(Path(tmp) / "adapter.safetensors"), "reload")
        record = json.loads((Path(tmp) / "adapter_config.json").read_text())
    diff = float((logits(lora) - trained).abs().max())
    rep.check("stage3", "adapter save and reload gives the trained logits back", diff == 0.0 and zeroed > 0 and record["parameters"] == counts,
              f"{size / 2**20:.1f} MiB adapter; max |dlogit| {diff} after reload ({zeroed:.3g} while zeroed)")

    # timing: train_loop vs Trainer + peft, same model, LoRA, conversations and steps, gradient checkpointing both
    from transformers import Trainer, TrainingArguments

    batch = S["s3_batch"]
    per_epoch = -(-len(raw) // batch)
    steps = S["s3_steps"] if not args.stage3_conversations else per_epoch
    assert steps % per_epoch == 0, "whole epochs: every side trains on the same tokens"
    lengths = [len(e.ids) for e in raw]
    ours_real = ours_padded = 0
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        chosen = epoch_batches(lengths, batch, 0, epoch)[index]
        ours_real += sum(lengths[i] for i in chosen)
        ours_padded += len(chosen) * max(lengths[i] for i in chosen)
    counts_t = {"real": 0, "padded": 0}

    def collate(items):
        chosen = [raw[item["index"]] for item in items]
        counts_t["real"] += sum(len(e.ids) for e in chosen)
        counts_t["padded"] += len(chosen) * max(len(e.ids) for e in chosen)
        return lora.batch(chosen)

    def ours(n_steps: int) -> float:
        """Trains; returns the seconds train_loop spent writing its resume checkpoint (it always writes one at the last
        step, which Trainer with save_strategy 'no' does not: timed apart so both sides are compared on training)."""
        import speechless.llm.adapt as adapt_module

        saving, spent = adapt_module.save_checkpoint, []

        def timed_save(*args, **kwargs):
            began = time.perf_counter()
            saving(*args, **kwargs)
            spent.append(time.perf_counter() - began)

        adapt_module.save_checkpoint = timed_save
        try:
            with tempfile.TemporaryDirectory() as work:
                train_loop(lora, lora.embed_audio_once(raw), n_steps, batch, 2e-4, 1, Path(work), "bench", 0, n_steps, "bench: ours",
                           gradient_checkpointing=True)
        finally:
            adapt_module.save_checkpoint = saving
        sync(device)
        return sum(spent)

    def trainer(n_steps: int, standard: bool = True) -> None:
        counts_t.update(real=0, padded=0)
        model.activation_checkpointing_enable()  # Trainer's own flag wants the wrapped module to have the method
        with tempfile.TemporaryDirectory() as work:
            settings = TrainingArguments(output_dir=work, per_device_train_batch_size=batch, max_steps=n_steps, learning_rate=2e-4,
                                         warmup_steps=1, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
                                         use_cpu=device.type != "cuda", report_to=[], save_strategy="no", logging_strategy="no",
                                         disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0)
            Trainer(model=LossOf(lora, standard), args=settings, train_dataset=[{"input_ids": e.ids, "index": i} for i, e in enumerate(raw)],
                    data_collator=collate).train()
        model.activation_checkpointing_disable()
        sync(device)

    with torch.no_grad():  # the anchor trains the same objective: transformers' own loss equals ours on a batch
        ours_loss, standard_loss = float(lora.loss(probe)), float(LossOf(lora, True)(**probe)["loss"])
    rep.check("stage3", "Trainer's standard loss (logits at every position) equals train_loop's (logits where labelled)",
              abs(ours_loss - standard_loss) <= tol * max(1, abs(ours_loss)), f"{standard_loss:.6f} vs {ours_loss:.6f}")
    ours(1), trainer(1), trainer(1, False)  # warm-up: no side pays the one-off allocations
    before = load_average()
    runs = alternate({"ours": partial(ours, steps), "trainer": partial(trainer, steps),
                      "trainer_own_loss": partial(trainer, steps, False)}, S["rounds"])
    result["load_average"] = {"before": before, "after": load_average()}
    (checkpoint_s, o), t, t_own = runs["ours"], runs["trainer"][1], runs["trainer_own_loss"][1]
    ours_rate, trainer_rate, own_loss_rate = (ours_real / (o["seconds"] - checkpoint_s), counts_t["real"] / t["seconds"],
                                              counts_t["real"] / t_own["seconds"])
    with_checkpoint_rate = ours_real / o["seconds"]
    result["train"] = {"conversations": len(raw), "steps": steps, "batch": batch, "gradient_checkpointing": True,
                       "ours": {**o, "real_tokens": ours_real, "padded_tokens": ours_padded, "tokens_per_s": round(ours_rate, 2),
                                "resume_checkpoint_seconds": round(checkpoint_s, 2), "tokens_per_s_with_checkpoint": round(with_checkpoint_rate, 2)},
                       "trainer": {**t, "real_tokens": counts_t["real"], "padded_tokens": counts_t["padded"], "tokens_per_s": round(trainer_rate, 2)},
                       "trainer_own_loss": {**t_own, "tokens_per_s": round(own_loss_rate, 2)},
                       "peak_rss_gib_process": rss_gib()}
    rep.data["parts"]["stage3"] = result
    rep.row("stage3", f"LoRA r{rank} training tokens/s ({shape}, {params / 1e9:.2f} B, {dtype_name}, grad ckpt, {steps} x {batch} conv.) "
            "train_loop vs Trainer + peft", round(ours_rate, 2), round(trainer_rate, 2), ours_rate / trainer_rate, ">= 1.3x",
            ours_rate / trainer_rate >= 1.3)
    rep.row("stage3", f"the same with train_loop's end-of-training resume checkpoint counted ({checkpoint_s:.1f} s; Trainer saves none)",
            round(with_checkpoint_rate, 2), round(trainer_rate, 2), with_checkpoint_rate / trainer_rate)
    rep.row("stage3", "the same, Trainer + peft given train_loop's loss (logits where labelled): what the loop alone adds",
            round(ours_rate, 2), round(own_loss_rate, 2), ours_rate / own_loss_rate)
    rep.row("stage3", "padded positions fed (ours vs Trainer)", ours_padded, counts_t["padded"], ours_padded / max(counts_t["padded"], 1))
    if device.type == "cuda":
        gib = o.get("peak_gpu_mib", 0) / 1024
        rep.row("stage3", "peak GPU memory allocated, LoRA training (GiB)", round(gib, 2), round(t.get("peak_gpu_mib", 0) / 1024, 2),
                None, "<= 40 GB", gib * 2**30 <= 40e9)
    else:
        rep.row("stage3", "peak RSS above start, LoRA training (MiB; process peak GiB in JSON)", o["peak_mib"], t["peak_mib"], None,
                "<= 40 GB on a GPU", None)
    rep.check("stage3", "both sides trained on the same real tokens", ours_real == counts_t["real"], f"{ours_real} vs {counts_t['real']}")
    lora = speech_lm = model = None  # frees them before the next part
    free()


# ----------------------------------------------------------------------------------------------------------- main

RUNNERS = {"counts": part_counts, "tokenize": part_tokenize, "encode": part_encode, "rvq_train": part_rvq_train,
           "stage2": part_stage2, "stage3": part_stage3}


def render(rep: Report) -> str:
    def fmt(v):
        return "" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    rows = [[r["part"], r["measure"], fmt(r["ours"]), fmt(r["anchor"]), "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
             if r["part"] != "counts" else f"{r['ratio']:.4f}", r["bar"], "" if r["met"] is None else ("yes" if r["met"] else "NO")]
            for r in rep.data["rows"]]
    rows += [[c["part"], f"check: {c['check']}", c["detail"], "", "", "pass", "yes" if c["passed"] else "NO"] for c in rep.data["checks"]]
    return table(["part", "measure", "ours", "anchor", "ratio", "bar", "met?"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=tuple(SCALES), default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N] (RVQ encode stays on CPU)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default runs/bench/full_size_<scale>.json)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--stage3-dtype", choices=("float32", "bfloat16"), default=None, help="stage-3 weights (default: smoke fp32, full bf16)")
    parser.add_argument("--stage3-conversations", type=int, default=0, help="stage 3: conversations (one epoch is timed; 0 = the scale's)")
    parser.add_argument("--stage3-max-frames", type=int, default=0, help="stage 3: longest audio block in frames (0 = the scale's)")
    parser.add_argument("--e2b-layers", type=int, default=0, help="stage 3 at full scale: E2B blocks to build (0 = 35 on CUDA, 10 on CPU)")
    args = parser.parse_args()
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(chosen) - set(PARTS)):
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    out = args.out or Path(f"runs/bench/full_size_{args.scale}.json")
    S = SCALES[args.scale]
    rep = Report(args)
    rep.data["parts_run"] = chosen
    print(f"machine: {rep.data['machine']}\nscale {args.scale}, device {args.device}, parts {', '.join(chosen)}\n", flush=True)
    for name in chosen:
        before, started = load_average(), time.perf_counter()
        RUNNERS[name](args, S, rep)
        rep.data["load_average"][name] = {"before": before, "after": load_average(), "seconds": round(time.perf_counter() - started, 1),
                                          "peak_rss_gib_process": rss_gib()}
        print(f"{name}: {time.perf_counter() - started:.1f} s, load {before} -> {load_average()}, process peak RSS {rss_gib()} GiB\n", flush=True)
        free()
    rep.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = render(rep)
    rep.data["table"] = text
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep.data, indent=2, default=str) + "\n")
    print(text + f"\n\nresults: {out}")
    failed = [c for c in rep.data["checks"] if not c["passed"]]
    if failed:
        print(f"{len(failed)} check(s) FAILED", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
