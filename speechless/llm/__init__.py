"""Stage 3, LLM adaptation: the speech LM and its adapters (LoRA, depth up-scaling), instructions, stage-3 data,
scoring and inference, text-skill evaluation. Imports `core`, `data`, `speech` and `t2s`."""
