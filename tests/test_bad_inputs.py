"""The bad-input catalogue: every row of `CASES` feeds one bad input to the CLI and asserts the exit code (2 usage /
bad input, 1 runtime), ONE `error:` line naming the culprit (file, line, field or key), and that nothing in the
working folder changed (file tree + sha256 of every file, before and after; outputs point into it)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import soundfile as sf
from conftest import stage1_overrides


class Case(NamedTuple):
    make: Callable[[dict], list[str]]
    """ctx -> CLI arguments; creates the bad input under ctx['tmp'] (outputs go to ctx['out'])."""
    exit_code: int
    culprit: str
    """Regex the single error line must match (the file/line/field/key at fault)."""


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------------- manifests

def corpus_rows(ctx: dict) -> list[dict]:
    rows = [json.loads(line) for line in ctx["corpus"].read_text().splitlines()]
    return [dict(r, audio_filepath=str(ctx["corpus"].parent / r["audio_filepath"])) for r in rows]


def train_with_manifest(mutate: Callable[[list[dict], dict], list]) -> Callable[[dict], list[str]]:
    """`stage1 train` on the tiny corpus's manifest after `mutate(rows, ctx)`, written to ctx['tmp']/bad.jsonl."""
    def make(ctx: dict) -> list[str]:
        manifest = jsonl(ctx["tmp"] / "bad.jsonl", mutate(corpus_rows(ctx), ctx))
        return set_args("stage1", "train", settings=stage1_overrides(manifest, ctx["encoder_json"], ctx["out"] / "run", ctx["out"] / "store"))
    return make


def set_args(*command: str, settings: list[str] = ()) -> list[str]:
    return [*command, *[arg for item in settings for arg in ("--set", item)]]


def edit_row(index: int, **changes) -> Callable[[list[dict], dict], list]:
    return lambda rows, ctx: [dict(r, **changes) if i == index else r for i, r in enumerate(rows)]


def drop_field(index: int, name: str) -> Callable[[list[dict], dict], list]:
    return lambda rows, ctx: [{k: v for k, v in r.items() if k != name} if i == index else r for i, r in enumerate(rows)]


def non_utf8_manifest(ctx: dict) -> list[str]:
    path = ctx["tmp"] / "bad.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in corpus_rows(ctx)[:2]) + b'{"id": "\xff\xfe"}\n')
    return set_args("stage1", "train", settings=stage1_overrides(path, ctx["encoder_json"], ctx["out"] / "run", ctx["out"] / "store"))


# ----------------------------------------------------------------------------------------------------------- audio

def tokenize_file(make_audio: Callable[[Path], Path]) -> Callable[[dict], list[str]]:
    def make(ctx: dict) -> list[str]:
        return ["tokenize", "audio", make_audio(ctx["tmp"]), "--tokenizer", ctx["stage1_trained"], "--output", ctx["out"] / "tokens.jsonl"]
    return make


def wav(name: str, samples) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        sf.write(tmp / name, np.asarray(samples, np.float32), 16000, subtype="FLOAT")
        return tmp / name
    return make


def raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


# ------------------------------------------------------------------------------------------------ text and stage 2

def texts_file(lines: list) -> Callable[[dict], list[str]]:
    def make(ctx: dict) -> list[str]:
        path = jsonl(ctx["tmp"] / "texts.jsonl", lines)
        return ["stage2", "generate", "-i", path, "-o", ctx["out"] / "gen.jsonl", "--model", ctx["stage2_reference"], "--max-seconds", "1"]
    return make


def stage2_with_tokens(mutate: Callable[[list[dict]], list]) -> Callable[[dict], list[str]]:
    """`stage2 train` on a copy of the fake stage-1 run whose tokens/train.jsonl went through `mutate`."""
    from test_stage2 import overrides

    def make(ctx: dict) -> list[str]:
        stage1 = ctx["tmp"] / "stage1"
        shutil.copytree(ctx["stage2_base"] / "stage1", stage1)
        path = stage1 / "tokens" / "train.jsonl"
        jsonl(path, mutate([json.loads(line) for line in path.read_text().splitlines()]))
        return set_args("stage2", "train", settings=overrides(ctx["stage2_base"], ctx["out"] / "run", f"data.stage1={stage1}"))
    return make


def edit_token_row(index: int, **changes) -> Callable[[list[dict]], list]:
    return lambda rows: [dict(r, **changes) if i == index else r for i, r in enumerate(rows)]


# --------------------------------------------------------------------------------------------------- checkpoints

def tokenizer_copy(damage: Callable[[Path], None]) -> Callable[[dict], list[str]]:
    """`tokenize audio` with a copy of the stage-1 checkpoint after `damage(folder)`."""
    def make(ctx: dict) -> list[str]:
        folder = ctx["tmp"] / "ckpt"
        shutil.copytree(ctx["stage1_trained"], folder, ignore=shutil.ignore_patterns("work"))
        damage(folder)
        audio = next(r["audio_filepath"] for r in corpus_rows(ctx))
        return ["tokenize", "audio", audio, "--tokenizer", folder, "--output", ctx["out"] / "tokens.jsonl"]
    return make


def truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return damage


def flip_byte(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # inside the codebook bytes: the file still parses
    (folder / "model.safetensors").write_bytes(bytes(data))


def only_pickle(folder: Path) -> None:
    for name in ("model.safetensors", "model.best.safetensors", "model.averaged.safetensors"):
        (folder / name).unlink()
    (folder / "model.pt").write_bytes(b"\x80\x04K\x01.")


def store_args(ctx: dict, *args) -> list:
    return [*args, "--store-root", ctx["stage2_base"] / "store"]


def push_with(name: str, data: bytes) -> Callable[[dict], list]:
    def make(ctx: dict) -> list:
        folder = ctx["tmp"] / "ckpt"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / name).write_bytes(data)
        return ["hub", "push", folder, "--stage", "stage1", "--store-root", ctx["out"] / "store"]
    return make


def config_file(text: str) -> Callable[[dict], list]:
    def make(ctx: dict) -> list:
        (ctx["tmp"] / "cfg.yaml").write_text(text)
        return ["stage1", "train", "-c", ctx["tmp"] / "cfg.yaml", "--set", f"run.out_dir={ctx['out'] / 'run'}"]
    return make


def import_config(text: str) -> Callable[[dict], list]:
    def make(ctx: dict) -> list:
        (ctx["tmp"] / "import.yaml").write_text(text)
        return ["data", "import", "-c", ctx["tmp"] / "import.yaml", "--out", ctx["out"] / "imported"]
    return make


CASES: dict[str, Case] = {
    # manifests (stage1 train)
    "manifest: line not JSON": Case(train_with_manifest(lambda rows, ctx: rows[:1] + ["{not json"] + rows[1:]), 2, r"bad\.jsonl:2: not valid JSON"),
    "manifest: missing field": Case(train_with_manifest(drop_field(2, "duration")), 2, r"bad\.jsonl:3: field 'duration': missing"),
    "manifest: negative duration": Case(train_with_manifest(edit_row(0, duration=-1.5)), 2, r"bad\.jsonl:1: field 'duration'"),
    "manifest: text not a string": Case(train_with_manifest(edit_row(1, text=["a"])), 2, r"bad\.jsonl:2: field 'text'"),
    "manifest: duplicate id": Case(train_with_manifest(lambda rows, ctx: rows + [rows[0]]), 2, r"bad\.jsonl:25: field 'id': duplicate"),
    "manifest: audio file missing": Case(train_with_manifest(edit_row(3, audio_filepath="/nowhere/x.wav")), 2, r"bad\.jsonl:4: field 'audio_filepath'.*/nowhere/x\.wav"),
    "manifest: not UTF-8": Case(non_utf8_manifest, 2, r"bad\.jsonl:3: not valid UTF-8"),
    "manifest: a JSON array": Case(train_with_manifest(lambda rows, ctx: ["[1, 2]"] + rows), 2, r"bad\.jsonl:1: expected a JSON object"),
    "manifest: empty": Case(train_with_manifest(lambda rows, ctx: []), 2, r"bad\.jsonl: manifest has no entries"),
    "manifest: no dev split": Case(train_with_manifest(lambda rows, ctx: [r for r in rows if r["split"] != "dev"]), 2, r"bad\.jsonl: no utterances in split 'dev' \(data\.eval_split\)"),
    # audio (tokenize audio)
    "audio: corrupt wav": Case(tokenize_file(raw("corrupt.wav", b"RIFF\x00\x00\x00\x00WAVEfmt garbage")), 2, r"corrupt\.wav"),
    "audio: text file named .wav": Case(tokenize_file(raw("notes.wav", b"hello, this is not audio\n" * 50)), 2, r"notes\.wav"),
    "audio: zero samples": Case(tokenize_file(wav("empty.wav", [])), 2, r"empty\.wav"),
    "audio: NaN samples": Case(tokenize_file(wav("nan.wav", np.full(16000, np.nan))), 2, r"nan\.wav"),
    "audio: file not found": Case(tokenize_file(lambda tmp: tmp / "missing.wav"), 2, r"missing\.wav: audio file not found"),
    # text (stage2 generate)
    "text: empty": Case(texts_file([{"id": "a", "text": "Naku gabu."}, {"id": "b", "text": "   "}]), 2, r"'b'.*empty text"),
    "text: unseen characters only": Case(texts_file([{"id": "a", "text": "ɛɔɛ ŋŋ"}]), 2, r"'a'.*never saw in training"),
    "text: input line not JSON": Case(texts_file([{"id": "a", "text": "x"}, '{"id": "b", "tex']), 2, r"texts\.jsonl:2: not valid JSON"),
    "text: row without text": Case(texts_file([{"id": "a", "words": "x"}]), 2, r"texts\.jsonl:1: expected a JSON object with a 'text' field"),
    "text: duplicate id": Case(texts_file([{"id": "a", "text": "Naku."}, {"id": "a", "text": "Gabu."}]), 2, r"texts\.jsonl:2: id 'a' appears twice"),
    # configs
    "config: unknown key": Case(lambda ctx: ["stage1", "train", "--set", "train.stepz=3", "--set", f"run.out_dir={ctx['out'] / 'run'}"], 2, r"unknown key 'train\.stepz'.*did you mean 'train\.steps'"),
    "config: wrong type": Case(lambda ctx: ["stage1", "train", "--set", "train.steps=many", "--set", f"run.out_dir={ctx['out'] / 'run'}"], 2, r"train\.steps"),
    "config: --set without '='": Case(lambda ctx: ["stage1", "train", "--set", "train.steps", "--set", f"run.out_dir={ctx['out'] / 'run'}"], 2, r"train\.steps"),
    "config: YAML syntax": Case(config_file("train:\n  steps: [1, 2\n"), 2, r"cfg\.yaml"),
    "config: file not found": Case(lambda ctx: ["stage1", "train", "-c", ctx["tmp"] / "nope.yaml"], 2, r"nope\.yaml"),
    "config: negative stage-2 steps": Case(lambda ctx: ["stage2", "train", "--set", "train.steps=-1", "--set", f"run.out_dir={ctx['out'] / 'run'}"], 2, r"train\.steps"),
    # token files (stage2 train on a stage-1 folder)
    "tokens: line not JSON": Case(stage2_with_tokens(lambda rows: rows[:2] + ['{"id": "x", "co'] + rows[2:]), 2, r"train\.jsonl:3: not valid JSON"),
    "tokens: another stage-1 revision": Case(stage2_with_tokens(edit_token_row(1, stage1_revision="0" * 64)), 2, r"train\.jsonl:2: tokens come from stage-1 revision 000000000000"),
    "tokens: ragged levels": Case(stage2_with_tokens(lambda rows: [dict(r, codes=[r["codes"][0], r["codes"][1][:-1], *r["codes"][2:]]) if i == 0 else r for i, r in enumerate(rows)]), 2, r"train\.jsonl:1: field 'codes'"),
    "tokens: codes not lists": Case(stage2_with_tokens(edit_token_row(0, codes=7)), 2, r"train\.jsonl:1: field 'codes'"),
    "tokens: code out of range": Case(stage2_with_tokens(lambda rows: [dict(r, codes=[[9999] * len(r["codes"][0]), *r["codes"][1:]]) if i == 0 else r for i, r in enumerate(rows)]), 2, r"train\.jsonl:1: field 'codes'.*9999"),
    "tokens: missing field": Case(stage2_with_tokens(lambda rows: [{k: v for k, v in r.items() if k != "codes"} if i == 4 else r for i, r in enumerate(rows)]), 2, r"train\.jsonl:5: missing field 'codes'"),
    # checkpoints (tokenize audio --tokenizer FOLDER)
    "checkpoint: truncated weights": Case(tokenizer_copy(truncate("model.safetensors")), 1, r"ckpt/model\.safetensors"),
    "checkpoint: config not JSON": Case(tokenizer_copy(truncate("config.json")), 1, r"ckpt/config\.json: not valid JSON"),
    "checkpoint: no config": Case(tokenizer_copy(lambda folder: (folder / "config.json").unlink()), 2, r"ckpt/config\.json: file not found"),
    "checkpoint: weights bit flip (provenance sha256)": Case(tokenizer_copy(flip_byte), 1, r"ckpt/model\.safetensors: sha256"),
    "checkpoint: only a pickle": Case(tokenizer_copy(only_pickle), 2, r"ckpt/model\.safetensors: file not found"),
    # paths from configs and imported datasets (traversal)
    "synth: voice name with a path": Case(lambda ctx: ["data", "synth", "--out", ctx["out"] / "corpus", "--set", "num_sentences=2",
                                                      "--set", "voices=[{variant: m1, name: ../../escaped}]"], 2, r"voices\.0\.name"),
    "import: split mapped to a path": Case(import_config("dataset: x/y\nsplits: {train: ../up}\n"), 2, r"import\.yaml.*splits"),
    "manifest: split with a path": Case(train_with_manifest(edit_row(0, split="../../escaped")), 2, r"bad\.jsonl:1: field 'split'"),
    # store references and pushes
    "store: unknown version": Case(lambda ctx: store_args(ctx, "hub", "download", "stage1@v9", "--to", ctx["out"] / "dl"), 2, r"stage1@v9: no such version.*available: v1"),
    "store: malformed ref": Case(lambda ctx: store_args(ctx, "hub", "show", "Stage1@v1"), 2, r"store ref 'Stage1@v1'"),
    "store: bad version form": Case(lambda ctx: ["tokenize", "audio", corpus_rows(ctx)[0]["audio_filepath"], "--tokenizer", "stage1@vx"], 2, r"stage1@vx: not a checkpoint folder nor a store reference"),
    "store: unknown stage": Case(lambda ctx: store_args(ctx, "tokenize", "text", "Naku.", "--model", "stage7@v1"), 2, r"stage7: no versions"),
    "store: push a pickle": Case(push_with("weights.pkl", b"\x80\x04K\x01."), 2, r"refusing to push pickles or code \(weights\.pkl\)"),
    "store: push Python code": Case(push_with("loader.py", b"print('hi')\n"), 2, r"refusing to push pickles or code \(loader\.py\)"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, request, tmp_path, cli):
    case = CASES[name]
    ctx = {"tmp": tmp_path, "out": tmp_path / "out",  # session fixtures: built once for the whole table
           **{f: request.getfixturevalue(f) for f in ("corpus", "encoder_json", "stage1_trained", "stage2_base", "stage2_reference")}}
    ctx["out"].mkdir()
    (ctx["out"] / "previous-results.json").write_text('{"kept": true}\n')
    args = case.make(ctx)
    before = tree(tmp_path)
    result = cli(*args)
    after = tree(tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    message = " ".join(result.stderr.split())
    assert result.exit_code == case.exit_code, result.stderr
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(case.culprit, message), message
    assert after == before, "the failed command changed files"


def test_catalogue_size():
    assert len(CASES) >= 25
