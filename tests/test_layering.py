"""The layering contract: arrows only downwards.

application (`speechless/cli.py`, `speechless/__main__.py`, `speechless/commands/`, `speechless/pipeline.py`)
    -> recipes (`stages/*.py`, one per stage; they never import each other)
        -> library (the rest of `speechless/`; it never imports a recipe, an experiment, a benchmark or the application)

Inside the library, one subpackage per stage, ordered as the stages run: `core` (what every stage uses) -> `data`
(corpora, manifests) -> `speech` (stage 1) -> `t2s` (stage 2) -> `llm` (stage 3). A subpackage imports only itself and
those before it: the core imports no stage, and a stage never imports a later stage's subpackage. Every library module
lives in one of them.

`experiments/` (research scripts) and `benchmarks/` (performance benchmarks) sit on top; a benchmark imports no recipe
and no experiment. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = ("speechless.cli", "speechless.__main__", "speechless.commands", "speechless.pipeline")
LIBRARY = ("speechless.core", "speechless.data", "speechless.speech", "speechless.t2s", "speechless.llm")
"""The library's subpackages in stage order: each may import only itself and those before it."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_of(path: Path) -> str:
    name = module_name(path)
    if within(name, APPLICATION):
        return "application"
    if name.startswith("speechless"):
        return "library"
    if name.startswith("stages"):
        return "recipe"
    return name.split(".")[0]  # experiments, benchmarks


def rank(name: str) -> int | None:
    """The position of the library subpackage `name` belongs to (None: not inside one)."""
    return next((i for i, package in enumerate(LIBRARY) if within(name, (package,))), None)


def violations() -> list[str]:
    found = []
    files = [p for folder in ("speechless", "stages", "benchmarks", "experiments") for p in sorted((ROOT / folder).rglob("*.py"))]
    for path in files:
        layer, own = layer_of(path), module_name(path)
        for line, name in imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {name}"
            if layer == "library" and (within(name, ("stages", "experiments", "benchmarks")) or within(name, APPLICATION)):
                found.append(f"{where}: the library imports no recipe, experiment, benchmark or application module")
            elif layer == "library" and rank(name) is not None and rank(own) is not None and rank(name) > rank(own):
                found.append(f"{where}: {LIBRARY[rank(own)]} imports only itself and {', '.join(LIBRARY[:rank(own)]) or 'nothing else'}"
                             f" (stage order {' -> '.join(p.split('.')[1] for p in LIBRARY)})")
            elif layer == "recipe" and within(name, ("stages",)) and name != "stages" and not within(name, (own,)):
                found.append(f"{where}: a recipe imports no other recipe (move what they share into the library)")
            elif layer == "recipe" and (within(name, ("experiments", "benchmarks")) or within(name, APPLICATION)):
                found.append(f"{where}: a recipe imports only the library")
            elif layer == "benchmarks" and within(name, ("stages", "experiments")):
                found.append(f"{where}: a benchmark measures the library, not a recipe or an experiment")
        if layer == "library" and own != "speechless" and rank(own) is None:
            found.append(f"{path.relative_to(ROOT)}: a library module lives in one of {', '.join(LIBRARY)}")
    return found


def test_arrows_only_point_downwards():
    assert violations() == []


@pytest.mark.parametrize("source, bad", [
    ("from stages.stage2_t2s import train\n", True),
    ("def f():\n    from stages import stage1_rvq\n", True),
    ("import experiments.t2s_variants\n", True),
    ("from speechless.commands import stage1\n", True),
    ("from speechless.speech.tokens import load_split\n", False),
])
def test_the_contract_catches_an_upward_import(tmp_path, monkeypatch, source, bad):
    """The check itself can fail: a library module with an upward import is reported, with file and line."""
    fake_root = tmp_path / "repo"
    (fake_root / "speechless" / "speech").mkdir(parents=True)
    (fake_root / "speechless" / "__init__.py").write_text("")
    (fake_root / "speechless" / "speech" / "__init__.py").write_text("")
    (fake_root / "speechless" / "speech" / "bad.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    found = violations()
    assert bool(found) is bad
    if bad:
        assert found[0].startswith("speechless/speech/bad.py:") and "the library imports no" in found[0]


@pytest.mark.parametrize("module, source, bad", [
    ("core/io.py", "from speechless.speech.rvq import SpeechRVQ\n", True),
    ("core/io.py", "def f():\n    from speechless.data import manifest\n", True),
    ("data/audio.py", "from speechless.core.errors import UsageError\n", False),
    ("speech/rvq.py", "from speechless.t2s.probe import CTCProbe\n", True),
    ("t2s/probe.py", "from speechless.speech.rvq import SpeechRVQ\n", False),
    ("t2s/probe.py", "from speechless.llm import model\n", True),
    ("llm/adapt.py", "from speechless.t2s.generate import generate\n", False),
    ("llm/adapt.py", "from . import model\n", False),
    ("loose.py", "import math\n", True),
])
def test_the_contract_keeps_the_stage_order(tmp_path, monkeypatch, module, source, bad):
    """A subpackage importing a later stage's, or a library module outside the subpackages, is reported."""
    fake_root = tmp_path / "repo"
    path = fake_root / "speechless" / module
    for folder in [path.parent, *path.parent.parents]:
        if folder == fake_root:
            break
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
    path.write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    found = violations()
    assert bool(found) is bad
    if bad:
        assert found[0].startswith(f"speechless/{module}")
