"""`speechless hub ...`: push, list, show and download versioned checkpoints (local store folder or Hugging Face Hub).

Store selection, the same for every command that takes a store ref: --store-root / --backend / --hub-namespace, else
the environment (SPEECHLESS_STORE, SPEECHLESS_STORE_BACKEND, SPEECHLESS_HUB_NAMESPACE), else the local folder ./store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from speechless.commands.options import FormatOption, check_format
from speechless.core.errors import UsageError
from speechless.core.log import emit, info
from speechless.core.store import VERSION_RE, VersionInfo, open_store

app = typer.Typer(
    no_args_is_help=True,
    help=(
        "The versioned checkpoint store. Refs: STAGE@vN, STAGE@latest, STAGE (= latest) or STAGE@<revision prefix>. "
        "Store: --store-root DIR (or SPEECHLESS_STORE; default ./store), --backend local|hub "
        "(or SPEECHLESS_STORE_BACKEND), --hub-namespace NS (or SPEECHLESS_HUB_NAMESPACE). "
        "Hub auth: HF_TOKEN or `hf auth login`."
    ),
)

StoreRoot = Annotated[
    Path | None,
    typer.Option("--store-root", help="Local store folder (env SPEECHLESS_STORE; default ./store).", show_default=False),
]
Backend = Annotated[
    str | None,
    typer.Option("--backend", help="Store backend: local or hub (env SPEECHLESS_STORE_BACKEND; default local).", show_default=False),
]
Namespace = Annotated[
    str | None,
    typer.Option("--hub-namespace", help="Hub user/organisation owning the repos NS/speechless-STAGE (env SPEECHLESS_HUB_NAMESPACE; token: HF_TOKEN or hf auth login).", show_default=False),
]


def _open(root: Path | None, backend: str | None, namespace: str | None):
    if backend is not None and backend not in ("local", "hub"):
        raise UsageError(f"--backend {backend!r}: expected local or hub")
    return open_store(None, root=root, backend=backend, hub_namespace=namespace)


def _line(v: VersionInfo) -> str:
    when = v.created or "-"
    files = f"{len(v.files)} files" if v.files else ""
    parts = [v.ref, v.revision[:12], when, files, v.message]
    return "  ".join(p for p in parts if p)


@app.command("push")
def push(
    folder: Annotated[Path, typer.Argument(help="Checkpoint folder (safetensors + JSON/YAML/MD/JSONL; hidden files and work/ are skipped).", show_default=False)],
    stage: Annotated[str, typer.Option("--stage", help="Stage name, e.g. stage1 (lowercase letters, digits, _ and -).", show_default=False)],
    message: Annotated[str, typer.Option("--message", "-m", help="Note stored with the version.")] = "",
    fmt: FormatOption = "text",
    store_root: StoreRoot = None,
    backend: Backend = None,
    hub_namespace: Namespace = None,
) -> None:
    """Push FOLDER as the next immutable version of STAGE; prints `STAGE@vN REVISION`."""
    fmt = check_format(fmt)
    store = _open(store_root, backend, hub_namespace)
    version = store.push(stage, folder, message=message)
    info(f"pushed {len(version.files)} file(s) to {store.describe()} as {version.ref}")
    emit(version.to_dict() if fmt == "json" else f"{version.ref} {version.revision}", fmt)


@app.command("list")
def list_versions(
    stage: Annotated[str | None, typer.Argument(help="Only this stage (default: all stages).", show_default=False)] = None,
    fmt: FormatOption = "text",
    store_root: StoreRoot = None,
    backend: Backend = None,
    hub_namespace: Namespace = None,
) -> None:
    """List versions (oldest first): ref, revision, time, file count, message."""
    fmt = check_format(fmt)
    store = _open(store_root, backend, hub_namespace)
    versions = store.list(stage)
    if fmt == "json":
        emit([v.to_dict() for v in versions], fmt)
        return
    if not versions:
        info(f"no versions in {store.describe()}" + (f" for {stage}" if stage else ""))
        return
    emit("\n".join(_line(v) for v in versions))


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="Store ref: STAGE@vN, STAGE@latest, STAGE or STAGE@<revision>.", show_default=False)],
    fmt: FormatOption = "text",
    store_root: StoreRoot = None,
    backend: Backend = None,
    hub_namespace: Namespace = None,
) -> None:
    """Show a version's metadata: revision, time, location, message and files."""
    fmt = check_format(fmt)
    version = _open(store_root, backend, hub_namespace).resolve(ref)
    if fmt == "json":
        emit(version.to_dict(), fmt)
        return
    lines = [
        f"ref:      {version.ref}",
        f"revision: {version.revision}",
        f"created:  {version.created or '-'}",
        f"location: {version.location}",
        f"message:  {version.message}",
        f"files:    {len(version.files)}",
    ]
    lines += [f"  {f}" for f in version.files]
    emit("\n".join(lines))


@app.command("download")
def download(
    ref: Annotated[str, typer.Argument(help="Store ref: STAGE@vN, STAGE@latest, STAGE or STAGE@<revision>.", show_default=False)],
    to: Annotated[Path | None, typer.Option("--to", help="Copy the version's files into this new or empty folder (default: print the store's read-only folder).", show_default=False)] = None,
    fmt: FormatOption = "text",
    store_root: StoreRoot = None,
    backend: Backend = None,
    hub_namespace: Namespace = None,
) -> None:
    """Fetch a version (checking every file's sha256 on the local store) and print the folder holding exactly its files."""
    fmt = check_format(fmt)
    store = _open(store_root, backend, hub_namespace)
    version = store.resolve(ref)
    # Download exactly what was just resolved (pinned to its version), so a concurrent push cannot change the answer.
    folder = store.download(version.ref if VERSION_RE.fullmatch(version.version) else ref, to)
    if fmt == "json":
        emit({**version.to_dict(), "folder": str(folder)}, fmt)
    else:
        emit(str(folder))
