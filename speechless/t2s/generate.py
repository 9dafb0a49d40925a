"""Stage-2 generation: text -> stage-1 semantic tokens with a trained Speechless model.

`load_stage2` opens a checkpoint (folder or `stage2@vN`, weights sha256 checked against its provenance);
`generate_rows` turns text requests into token rows (the stage-1 JSONL format); `generate_corpus` converts a whole
text file resumably (`OUT.partial`, then an atomic rename). Used by `speechless tokenize text`, `stage2 generate` and
stage 3's synthetic speech.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from speechless.core import log
from speechless.core.config import Section
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import write_text
from speechless.core.runs import verify_weights
from speechless.core.store import StoreConfig
from speechless.speech.tokens import check_stage1_match, read_token_jsonl, token_row
from speechless.t2s.config import FRAMES_PER_SECOND
from speechless.t2s.model import T2SModel

WEIGHT_FILES = {"final": "model.safetensors", "best": "model.best.safetensors"}
"""A stage-2 checkpoint's weight files: the last step's and the lowest eval loss's."""


class GenerateConfig(Section):
    temperature: float = Field(0.7, ge=0.0)
    """Autoregressive decoder: 0 = greedy; > 0 = sampling at this temperature (with top_k). Greedy decoding of a weak
    model can loop without ending; sampling is the default (evidence: docs/results.md). The parallel decoder is
    deterministic and ignores temperature and top_k."""
    top_k: int = Field(30, ge=0)
    """With sampling: keep only the k most likely codes per level (0 = all)."""
    guidance: float = Field(1.0, ge=0.0)
    """Classifier-free guidance weight w: 1 = off (the model as trained); w > 1 samples from u + w (c - u), the
    text-conditioned logits (parallel decoder: vectors) c pushed away from the text-free ones u, at twice the
    generation cost. Needs a model trained with model.unconditional_prob > 0."""
    max_seconds: float = Field(30.0, gt=0.0)
    """Cap on generated speech per text chunk (25 frames per second); a text that reaches it is cut, with a warning."""
    batch_size: int = Field(64, ge=1)
    """Texts generated together."""
    speaker: str | None = None
    """Voice to generate in (a speaker of the training data); None = the first one."""
    seed: int = 0
    """Seed for sampling."""


@dataclass
class GenRequest:
    id: str
    text: str
    speaker: str | None = None


def generate_rows(model: T2SModel, requests: list[GenRequest], gen: GenerateConfig, warn_limit: int = 5) -> list[dict]:
    """Token rows (the stage-1 JSONL format, plus `source`, `speaker`, `capped`) for each request, in request order.

    Texts are checked and tokenized first (a bad text is a UsageError naming its id before anything is generated);
    chunks of long texts are generated separately and concatenated; rows are batched by text length.
    """
    encoded = []
    notes_shown = 0
    for req in requests:
        enc = model.text.encode(req.text, where=f"text {req.id!r}")
        for note in enc.notes:
            if notes_shown < warn_limit:
                log.warn(f"text {req.id!r}: {note}")
            notes_shown += 1
        encoded.append(enc)
    if notes_shown > warn_limit:
        log.warn(f"... {notes_shown - warn_limit} more text warning(s) of the same kinds")
    spk = [model.speaker_index(req.speaker if req.speaker is not None else gen.speaker) for req in requests]
    jobs = [(r, c) for r, enc in enumerate(encoded) for c in range(len(enc.chunks))]
    jobs.sort(key=lambda job: len(encoded[job[0]].chunks[job[1]]))
    pieces: dict[tuple[int, int], torch.Tensor] = {}
    capped_rows: set[int] = set()
    max_frames = max(1, int(round(gen.max_seconds * FRAMES_PER_SECOND)))
    generator = torch.Generator().manual_seed(gen.seed)
    for start in range(0, len(jobs), gen.batch_size):
        group = jobs[start:start + gen.batch_size]
        codes, capped = model.generate([encoded[r].chunks[c] for r, c in group], [spk[r] for r, _ in group],
                                       max_frames=max_frames, temperature=gen.temperature, top_k=gen.top_k,
                                       generator=generator, guidance=gen.guidance)
        for (r, c), code, cap in zip(group, codes, capped):
            pieces[(r, c)] = code
            if cap:
                capped_rows.add(r)
    if capped_rows:
        ids = ", ".join(repr(requests[r].id) for r in sorted(capped_rows)[:5])
        log.warn(f"{len(capped_rows)} text(s) reached the cap of {max_frames} frames ({gen.max_seconds:g} s, generate.max_seconds) "
                 f"without end-of-audio and were cut there: {ids}")
    rows = []
    for r, req in enumerate(requests):
        code = torch.cat([pieces[(r, c)] for c in range(len(encoded[r].chunks))], 1)  # (Q, T)
        frames = code.shape[1]
        row = token_row(req.id, req.text, code.T, [[0.0, round(frames / FRAMES_PER_SECOND, 3), frames]], model.codebook_size,
                        model.stage1["revision"])
        row.update(source="stage2", speaker=model.speakers[spk[r]] if model.speaker_embed is not None else None,
                   capped=r in capped_rows)
        rows.append(row)
    return rows


def read_text_requests(path: Path) -> list[GenRequest]:
    """Texts to convert: JSONL rows with `text` (and optional `id`, `speaker`); `.txt`: one text per line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: input file not found")
    requests, seen = [], set()
    lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")  # not splitlines(): U+2028 in a text is no line end
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            req = GenRequest(id=f"{path.stem}-{number:06d}", text=line)
        else:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or "text" not in row:
                raise UsageError(f"{path}:{number}: expected a JSON object with a 'text' field")
            req = GenRequest(id=str(row.get("id", f"{path.stem}-{number:06d}")), text=row["text"], speaker=row.get("speaker"))
        if req.id in seen:
            raise UsageError(f"{path}:{number}: id {req.id!r} appears twice; ids name output rows and must be unique")
        seen.add(req.id)
        requests.append(req)
    if not requests:
        raise UsageError(f"{path}: no texts in the file")
    return requests


def _read_partial(partial: Path, model: T2SModel, model_revision: str) -> tuple[list[str], int]:
    """Complete rows already written by an interrupted run (their raw lines), dropping a half-written last line."""
    data = partial.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty when the last line is complete
    good, dropped = [], 0
    for number, raw in enumerate(lines, 1):
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RuntimeFailure(f"{partial}:{number}: corrupt line inside the partial output; delete the file to start over") from exc
        if row.get("stage1_revision") != model.stage1["revision"] or row.get("stage2_revision") != model_revision:
            raise UsageError(f"{partial}: was written by another stage-2 model or stage-1 version; delete it or choose another --output")
        good.append(raw.decode("utf-8"))
    if tail.strip():
        dropped = 1
    return good, dropped


def generate_corpus(model: T2SModel, model_revision: str, input_path: Path, output: Path, gen: GenerateConfig,
                    skip_invalid: bool = False) -> dict:
    """Convert a text corpus to token JSONL, resumably: rows go to `<output>.partial` (appended and flushed after each
    batch); a re-run keeps its complete rows, drops a half-written last line, and generates only what is missing; the
    finished file is written to `output` (atomically) and the partial file removed. With greedy decoding a resumed run
    gives exactly the rows of an uninterrupted one; with sampling, rows generated after the resume are new draws."""
    requests = read_text_requests(input_path)
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    if output.exists():
        existing = read_token_jsonl(output)
        if existing and (existing[0]["stage1_revision"] != model.stage1["revision"] or existing[0].get("stage2_revision") != model_revision):
            raise UsageError(f"{output}: exists and was written by another stage-2 model or stage-1 version; choose another --output")
        if {r["id"] for r in existing} == {r.id for r in requests}:
            log.info(f"{output}: already complete ({len(existing)} rows)")
            return {"output": str(output), "rows": len(existing), "generated": 0, "resumed": len(existing), "skipped": 0}
        raise UsageError(f"{output}: exists with other texts; choose another --output or delete it")
    done_lines, dropped = ([], 0)
    if partial.exists():
        done_lines, dropped = _read_partial(partial, model, model_revision)
        if dropped:
            log.warn(f"{partial}: dropped a half-written last line left by an interrupted run; that text is generated again")
        log.info(f"resuming: {len(done_lines)} of {len(requests)} texts already done in {partial}")
    done = {json.loads(line)["id"] for line in done_lines}
    todo = [r for r in requests if r.id not in done]
    skipped = []
    if skip_invalid:
        valid = []
        for req in todo:
            try:
                model.text.encode(req.text, where=f"text {req.id!r}")
                valid.append(req)
            except UsageError as exc:
                skipped.append({"id": req.id, "reason": str(exc)})
        if skipped:
            log.warn(f"skipping {len(skipped)} invalid text(s), e.g. {skipped[0]['reason']}")
        todo = valid
    else:
        for req in todo:  # fail before generating anything
            model.text.encode(req.text, where=f"text {req.id!r}")
    with open(partial, "wb") as handle:  # rewrite the good lines (drops any half line), then append
        handle.write("".join(line + "\n" for line in done_lines).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    by_id = {}
    with log.progress() as bar, open(partial, "ab") as handle:
        task = bar.add_task("generating tokens", total=len(requests) - len(skipped), completed=len(done))
        step = max(1, gen.batch_size)
        for start in range(0, len(todo), step):
            group = todo[start:start + step]
            rows = generate_rows(model, group, gen)
            for row in rows:
                row["stage2_revision"] = model_revision
                by_id[row["id"]] = row
            handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            bar.advance(task, len(group))
    # final file in input order, written atomically, then the partial file goes
    lines = {json.loads(line)["id"]: line for line in done_lines}
    lines.update({rid: json.dumps(row, ensure_ascii=False) for rid, row in by_id.items()})
    ordered = [lines[r.id] for r in requests if r.id in lines]
    write_text(output, "".join(line + "\n" for line in ordered))
    partial.unlink(missing_ok=True)
    if skipped:
        write_text(output.with_name(output.name + ".skipped.jsonl"), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))
    return {"output": str(output), "rows": len(ordered), "generated": len(by_id), "resumed": len(done_lines), "skipped": len(skipped)}


def load_stage2(ref: str, weights: str = "final", store_cfg: StoreConfig | None = None, device: str | None = None) -> tuple[T2SModel, str, Path]:
    """A stage-2 checkpoint (folder or `stage2@vN`) -> (model, weights revision, folder)."""
    from speechless.speech.tokenizer import resolve_checkpoint

    if weights not in WEIGHT_FILES:
        raise UsageError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_FILES)}")
    folder = resolve_checkpoint(ref, store_cfg)
    revision = verify_weights(folder / WEIGHT_FILES[weights], weights)
    model = T2SModel.load(folder, WEIGHT_FILES[weights], device=device)
    return model, revision, folder


def generate_file(ref: str, input_path: Path, output: Path, gen: GenerateConfig, weights: str = "final",
                  stage1_ref: str | None = None, store_cfg: StoreConfig | None = None, device: str | None = None,
                  skip_invalid: bool = False) -> dict:
    """`speechless stage2 generate`: a text file -> a token JSONL with the stage-2 checkpoint `ref` (resumable), refused
    when `stage1_ref` names another stage-1 version than the one the model was trained on."""
    model, revision, _ = load_stage2(ref, weights, store_cfg, device)
    check_stage1_match(model.stage1, stage1_ref, store_cfg)
    return generate_corpus(model, revision, input_path, output, gen, skip_invalid=skip_invalid)


def generate_texts(ref: str, texts: list[str], gen: GenerateConfig, weights: str = "final", stage1_ref: str | None = None,
                   store_cfg: StoreConfig | None = None) -> list[dict]:
    """`speechless tokenize text`: token rows (with `stage2_revision`) for a few texts."""
    model, revision, _ = load_stage2(ref, weights, store_cfg)
    check_stage1_match(model.stage1, stage1_ref, store_cfg)
    rows = generate_rows(model, [GenRequest(f"text-{i}", t) for i, t in enumerate(texts)], gen)
    for row in rows:
        row["stage2_revision"] = revision
    return rows
