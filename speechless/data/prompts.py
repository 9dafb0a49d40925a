"""Real human speech from Debian: the Asterisk telephony prompts, a small parallel corpus in four languages.

Debian packages the Asterisk "core sounds": one professional speaker per language reading the same set of prompts
("Please enter your password followed by the pound key."). The transcripts come with `asterisk-core-sounds-XX`
(`/usr/share/doc/asterisk-core-sounds-XX/core-sounds-XX.txt.gz`, lines `name: text`, `;` comments, names may hold a
folder such as `digits/1`) and the audio with `asterisk-core-sounds-XX-g722` (`/usr/share/asterisk/sounds/<locale>/
[folder/]name.g722`, raw 16 kHz wideband G.722 at 64 kbit/s, decoded with the `g722` package):

    language  locale (= speaker_id)  speaker         licence (debian/copyright)
    en        en_US_f_Allison        Allison Smith   CC-BY-SA-3.0 ("Files: *")
    es        es_MX_f_Allison        Allison Smith   CC-BY-SA-3.0 ("Files: *")
    fr        fr_CA_f_June           June Wallack    CC-BY-SA-3.0 ("Files: fr-*")
    it        it_IT_m_Carlo          Carlo Flora     CC-BY-3.0 ("Files: it-*")

A prompt's name is the same in every language, so the corpus is parallel: each row carries the prompt's text in the
other installed languages (`translations`) and one of them as `translation`.

Output layout of `import_prompts(cfg, out_dir)`:

    out_dir/
      all.jsonl                     every imported utterance (the returned manifest)
      train.jsonl dev.jsonl test.jsonl   the same rows, one file per non-empty split
      sentences.jsonl               one row per (language, prompt): sentence_id '<lang>/<name>', text, translation,
                                    translations, language, prompt, split (what stage 3's asr/ast tasks read)
      audio/<lang>/<name>.wav       16 kHz mono PCM-16 (the G.722 samples as decoded, no resampling)
      import_report.json            per language: utterances, minutes, speakers, written/resumed, dropped by reason
      resolved_config.yaml          the settings used

Manifest rows: id `<lang>-<name, '/' -> '-'>`, the text verbatim (ends stripped), `speaker_id` the locale folder,
`source` 'asterisk-core-sounds-XX-g722 <Debian version>', and the extra keys `licence`, `prompt`, `sentence_id`,
`translation`, `translations`.

What is kept. An entry is dropped, and counted under its reason in import_report.json, when: it is in `digits/` or
`letters/` (unless `keep_digits` / `keep_letters`); its text is empty; it is a tone or a noise, i.e. its whole text is
one `[...]`, `(...)` or `<...>` in ANY installed language (`beep: [this is a simple beep tone]` drops Italian's
`beep: un suono beep` too: it is the same sound); its text holds a note in brackets (`IAX (note: does not say "2")`:
what is spoken is unknown; `keep_annotated` keeps these); its text is mis-encoded (the Italian file has '?' for some
accented letters: `sar? esattamente`); it has fewer than `min_words` words (after `probe_text`); or it has no audio file
(a warning line lists these; not fatal). Audio files without a transcript line are counted too. A name differing only
in case from an audio file (`digits/1f` -> `digits/1F.g722`) takes that file.

Splits are BY PROMPT, shared by every language: a prompt goes to test when a seeded sha256 of its name falls below
`test_fraction`, to dev below `test_fraction + dev_fraction`, else to train. Prompts whose texts coincide (after
`probe_text`) in any installed language form one group, split as one (by the group's first name): `confbridge-mute-in`
and `confbridge-mute-out` say the same words, so neither can be trained on while the other is tested. No test prompt's
text or translation is then trained on in any language. The transcripts of every installed language are read (they
are small) for the translations, the tone rule and the groups, so the splits assume all four are installed
(`scripts/install.sh` installs them).

Scoring normalisation: the texts are kept verbatim; the scorer (`speechless.core.metrics.probe_text`, used by CER and
the probe) applies NFC, lower-cases, turns every punctuation mark, symbol, separator and control character into a
space and collapses spaces. So case and punctuation never count ("Agent Logged off." = "agent logged off"), accents
do (é is a letter), apostrophes split words ("d'agent" -> "d agent"), and digits are kept as written: "press 1" is
scored as "press 1", not "press one", although the speaker says "one"; '#', '*' and '@' vanish although the speaker
says "pound", "star", "at". Such prompts are as hard for every system scored; nothing is rewritten.

Resumable: a wav already written whose length matches its G.722 source is not decoded again. Every audio file to
(re)write is read and checked before anything is written: a corrupt one (empty, a container or text rather than raw
G.722, nothing decoded) is a UsageError naming it, and the output folder stays as it was. A missing package is a
UsageError naming what to `apt-get install` (a missing translation language only a warning: those rows get no
`translation`, counted as `without_translation`).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
from pydantic import Field, model_validator
from rich.markup import escape

from speechless.core import log
from speechless.core.config import Section, to_yaml
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import atomic_path, write_json, write_jsonl, write_text
from speechless.core.metrics import probe_text
from speechless.data.audio import SAMPLE_RATE, SILENCE_PEAK
from speechless.data.manifest import ManifestEntry, summarize, write_manifest, write_split_manifests

Language = Literal["en", "es", "fr", "it"]


@dataclass(frozen=True)
class Voice:
    """What Debian ships for one language: the sound folder (the speaker), who recorded it, under which licence."""

    locale: str
    recorded_by: str
    licence: str
    name: str


VOICES: dict[str, Voice] = {
    "en": Voice("en_US_f_Allison", "Allison Smith", "CC-BY-SA-3.0", "US English"),
    "es": Voice("es_MX_f_Allison", "Allison Smith", "CC-BY-SA-3.0", "Mexican Spanish"),
    "fr": Voice("fr_CA_f_June", "June Wallack", "CC-BY-SA-3.0", "Canadian French"),
    "it": Voice("it_IT_m_Carlo", "Carlo Flora", "CC-BY-3.0", "Italian"),
}
"""The four languages Debian packages (licences from debian/copyright, the same file in all eight packages)."""

SPLITS = ("train", "dev", "test")
DEFAULT_SOUNDS_ROOT = "/usr/share/asterisk/sounds"
DEFAULT_DOC_ROOT = "/usr/share/doc"

DROP_REASONS = (
    "unparsable line", "duplicate line", "unsafe name", "digits", "letters", "empty transcript", "tone/noise",
    "note in brackets", "mis-encoded text", "too few words", "no audio", "beyond max_prompts", "audio without transcript",
)
"""The reasons an entry (or, for the last, an audio file) is not imported, in the order they are checked."""


class PromptsConfig(Section):
    """`speechless data prompts`: the Asterisk prompts Debian packages (real speech, en/es/fr/it) -> wavs + manifests."""

    languages: list[Language] = Field(default_factory=lambda: ["en", "fr", "es", "it"], min_length=1)
    """Languages to import (en, es, fr, it); each needs asterisk-core-sounds-XX and asterisk-core-sounds-XX-g722."""
    sounds_root: str = DEFAULT_SOUNDS_ROOT
    """Folder holding the sound folders (<locale>/[folder/]name.g722); change it only for tests or a copied tree."""
    doc_root: str = DEFAULT_DOC_ROOT
    """Folder holding the packages' docs (asterisk-core-sounds-XX/core-sounds-XX.txt.gz, changelogs); as sounds_root."""
    keep_digits: bool = False
    """Keep the `digits/` folder (numbers, days, months: mostly one word each, spoken to compose numbers)."""
    keep_letters: bool = False
    """Keep the `letters/` folder (one letter or symbol name each)."""
    keep_annotated: bool = False
    """Keep entries whose text holds a note in brackets or parentheses (whether the note is spoken is unknown)."""
    min_words: int = Field(default=2, ge=1)
    """Drop prompts of fewer words than this (words of the `probe_text` form); 2 drops one-word prompts ('Calling.')."""
    dev_fraction: float = Field(default=0.1, ge=0, lt=1)
    """Share of prompt groups in dev (by a seeded hash of the name, the same for every language)."""
    test_fraction: float = Field(default=0.15, ge=0, lt=1)
    """Share of prompt groups in test (as dev_fraction); train gets the rest."""
    split_seed: int = 0
    """Seed of the split hash: another seed, another (equally sized) split."""
    translation_language: Language = "en"
    """The language whose text of the same prompt is each row's `translation` (stage 3's ast answer)."""
    english_translation_language: Language = "fr"
    """The `translation` of rows in translation_language itself (English rows with the defaults)."""
    max_prompts: int | None = Field(default=None, ge=1)
    """Import only the first N prompts (by name, after the filters) in every language; None = all (tests use a few)."""

    @model_validator(mode="after")
    def _check(self) -> PromptsConfig:
        if len(set(self.languages)) != len(self.languages):
            raise ValueError(f"languages {self.languages}: each language once")
        if self.translation_language == self.english_translation_language:
            raise ValueError("english_translation_language must differ from translation_language (it translates the "
                             "rows that are in translation_language)")
        if self.dev_fraction + self.test_fraction >= 1:
            raise ValueError(f"dev_fraction + test_fraction = {self.dev_fraction + self.test_fraction}: leave a share for train")
        return self

    def translation_of(self, lang: str) -> str:
        """The language of a `lang` row's `translation`."""
        return self.english_translation_language if lang == self.translation_language else self.translation_language


# ------------------------------------------------------------------------------------------------------------------
# The installed packages
# ------------------------------------------------------------------------------------------------------------------


def transcript_path(doc_root: str | Path, lang: str) -> Path:
    return Path(doc_root) / f"asterisk-core-sounds-{lang}" / f"core-sounds-{lang}.txt.gz"


def sound_folder(sounds_root: str | Path, lang: str) -> Path:
    """The language's sound folder: its locale folder (en_US_f_Allison), else the `<lang>` link Debian also makes."""
    root = Path(sounds_root)
    locale = root / VOICES[lang].locale
    return locale if locale.is_dir() else (root / lang).resolve()


def _install_hint(lang: str) -> str:
    return f"apt-get install asterisk-core-sounds-{lang} asterisk-core-sounds-{lang}-g722 (scripts/install.sh does)"


def package_version(doc_root: str | Path, package: str) -> str:
    """The Debian version of `package`: the first line of its changelog.Debian.gz, else dpkg-query, else 'unknown'."""
    changelog = Path(doc_root) / package / "changelog.Debian.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8", errors="replace") as handle:
            match = re.match(r"\S+ \(([^)]+)\)", handle.readline())
        if match:
            return match.group(1)
    except (OSError, EOFError, zlib.error):
        pass
    if shutil.which("dpkg-query"):
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return "unknown"


# ------------------------------------------------------------------------------------------------------------------
# Transcripts and text rules
# ------------------------------------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
"""A prompt name: folder/name segments without separators or leading dots (it names the output file)."""
_TONE = re.compile(r"\s*(\[[^\]]*\]|\([^)]*\)|<[^>]*>)\s*")
_BRACKETS = re.compile(r"[\[\]()<>]")


@dataclass
class Transcript:
    """One language's transcript file: name -> (line number, verbatim text), and the lines it could not use."""

    path: Path
    entries: dict[str, tuple[int, str]] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


def read_transcript(path: Path, lang: str) -> Transcript:
    """Parse a core-sounds-XX.txt.gz (UTF-8, with or without BOM). A line without 'name:' or with an unsafe name, and
    a second line for a name already seen, are counted and noted (the first line wins), not fatal."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the transcript ({exc}); reinstall it: apt-get install --reinstall "
                         f"asterisk-core-sounds-{lang}") from exc
    transcript = Transcript(path)
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not name:
            transcript.dropped["unparsable line"] += 1
            transcript.problems.append(f"{path}:{number}: no 'name: text'")
        elif not _NAME.fullmatch(name):
            transcript.dropped["unsafe name"] += 1
            transcript.problems.append(f"{path}:{number}: name {name!r} is not a plain file name")
        elif name in transcript.entries:
            transcript.dropped["duplicate line"] += 1
            transcript.problems.append(f"{path}:{number}: second line for {name!r} (line {transcript.entries[name][0]} kept)")
        else:
            transcript.entries[name] = (number, value.strip())
    return transcript


def is_tone(text: str) -> bool:
    """The whole text is one bracketed description ('[ascending tones]', '(beep)', '<beep ascending>'): no speech."""
    return bool(_TONE.fullmatch(text))


def is_misencoded(text: str) -> bool:
    """'?' standing for an accented letter ('sar? esattamente', 'La conferenza ? piena'), or U+FFFD: a question mark
    followed by a letter, alone between spaces, or after a word and before a lower-case word."""
    if "\ufffd" in text:
        return True
    for match in re.finditer(r"\?", text):
        before, after = text[: match.start()], text[match.end():]
        if after[:1].isalpha():
            return True
        if before.endswith(" ") and after.startswith(" "):
            return True
        if before[-1:].isalpha() and after.startswith(" ") and after.lstrip()[:1].islower():
            return True
    return False


def text_reason(text: str, keep_annotated: bool) -> str | None:
    """Why a transcript text is not speech we can use (a DROP_REASONS entry), or None."""
    if not text:
        return "empty transcript"
    if is_tone(text):
        return "tone/noise"
    if not keep_annotated and _BRACKETS.search(text):
        return "note in brackets"
    if is_misencoded(text):
        return "mis-encoded text"
    return None


def split_of(name: str, seed: int, dev_fraction: float, test_fraction: float) -> str:
    """The split of a prompt (group) name: a seeded sha256 as a number in [0, 1) against the fractions."""
    digest = hashlib.sha256(f"asterisk-prompts:{seed}:{name}".encode()).digest()
    share = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if share < test_fraction else "dev" if share < test_fraction + dev_fraction else "train"


def text_groups(texts: dict[str, dict[str, str]]) -> dict[str, str]:
    """{prompt name: its group's first name}: prompts whose `probe_text` forms coincide in any language, joined
    (transitively). `texts` is {language: {name: usable text}}."""
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        parent.setdefault(name, name)
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for by_name in texts.values():
        first_with: dict[str, str] = {}
        for name in sorted(by_name):
            find(name)
            key = probe_text(by_name[name])
            if not key:
                continue
            if key in first_with:
                a, b = find(first_with[key]), find(name)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first_with[key] = name
    return {name: find(name) for name in parent}


# ------------------------------------------------------------------------------------------------------------------
# G.722
# ------------------------------------------------------------------------------------------------------------------

_CONTAINERS = {b"RIFF": "a RIFF/WAV file", b"OggS": "an Ogg file", b"fLaC": "a FLAC file", b"ID3": "an MP3 file",
               b"#!AMR": "an AMR file", b"\x1f\x8b": "a gzip file", b"PK\x03\x04": "a zip file"}
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}


def decode_g722(data: bytes, name: str, lang: str) -> np.ndarray:
    """Raw 64 kbit/s G.722 bytes -> int16 samples at 16 kHz (two a byte). A corrupt file is a UsageError naming it:
    empty, a container or text instead of raw G.722, nothing decoded, or digital silence."""
    fix = f"the file is corrupt: reinstall it (apt-get install --reinstall asterisk-core-sounds-{lang}-g722)"
    if not data:
        raise UsageError(f"{name}: empty G.722 file (0 bytes); {fix}")
    for magic, what in _CONTAINERS.items():
        if data.startswith(magic):
            raise UsageError(f"{name}: {what}, not raw G.722 audio; {fix}")
    if len(data) >= 64 and all(byte in _TEXT_BYTES for byte in data[:4096]):
        raise UsageError(f"{name}: holds text, not G.722 audio; {fix}")
    try:
        import G722
    except ImportError as exc:
        raise UsageError("the G.722 decoder is missing: pip install 'g722>=1.2,<2' (a dependency of speechless)") from exc
    samples = np.frombuffer(G722.G722(SAMPLE_RATE, 64000).decode(data), dtype=np.int16)
    if samples.size == 0:
        raise UsageError(f"{name}: G.722 decoding gave no samples; {fix}")
    peak = int(np.abs(samples.astype(np.int32)).max())
    if peak < SILENCE_PEAK * 32768:
        raise UsageError(f"{name}: decodes to digital silence (peak {peak} of 32767); {fix}")
    return samples


def _written_frames(path: Path) -> int | None:
    """Frames of a 16 kHz mono wav written by an earlier run, None when absent or unusable."""
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError):
        return None
    return info.frames if info.samplerate == SAMPLE_RATE and info.channels == 1 and info.frames > 0 else None


# ------------------------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class _Language:
    """One language being imported: where its files are, what it keeps, and its counts."""

    lang: str
    transcript: Transcript
    folder: Path
    audio: dict[str, Path]
    keep: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    no_audio: list[str] = field(default_factory=list)


def _check_installed(cfg: PromptsConfig) -> tuple[dict[str, Path], dict[str, Path]]:
    """(transcript of every installed language, sound folder of every configured one); a configured language that is
    not installed is a UsageError naming the packages; a translation language that is not, a warning (no translations)."""
    transcripts = {lang: transcript_path(cfg.doc_root, lang) for lang in VOICES}
    transcripts = {lang: path for lang, path in transcripts.items() if path.is_file()}
    folders = {}
    for lang in cfg.languages:
        if lang not in transcripts:
            raise UsageError(f"{transcript_path(cfg.doc_root, lang)}: not found: asterisk-core-sounds-{lang} is not "
                             f"installed; {_install_hint(lang)}, or drop '{lang}' from languages")
        folder = sound_folder(cfg.sounds_root, lang)
        if not folder.is_dir():
            raise UsageError(f"{Path(cfg.sounds_root) / VOICES[lang].locale}: not found: asterisk-core-sounds-{lang}-g722 "
                             f"is not installed; {_install_hint(lang)}, or drop '{lang}' from languages")
        folders[lang] = folder
    for lang in cfg.languages:
        other = cfg.translation_of(lang)
        if other not in transcripts:
            key = "english_translation_language" if lang == cfg.translation_language else "translation_language"
            log.warn(f"{key} '{other}': {escape(str(transcript_path(cfg.doc_root, other)))} not found, so the '{lang}' rows get "
                     f"no translation; apt-get install asterisk-core-sounds-{other}, or choose another {key}")
    return transcripts, folders


def _audio_files(folder: Path) -> dict[str, Path]:
    """{name ('digits/1'): path} of every .g722 file under a sound folder."""
    return {path.relative_to(folder).with_suffix("").as_posix(): path for path in sorted(folder.rglob("*.g722"))
            if path.is_file()}


def _select(cfg: PromptsConfig, item: _Language, tones: set[str]) -> None:
    """Apply the rules of the module docstring to one language: its kept names (with audio), the drop counts."""
    by_lower: dict[str, list[str]] = {}
    for name in item.audio:
        by_lower.setdefault(name.lower(), []).append(name)
    used: set[str] = set()
    for name, (_, text) in sorted(item.transcript.entries.items()):
        folder = name.split("/", 1)[0] if "/" in name else ""
        reason = None
        if folder == "digits" and not cfg.keep_digits:
            reason = "digits"
        elif folder == "letters" and not cfg.keep_letters:
            reason = "letters"
        else:
            reason = text_reason(text, cfg.keep_annotated)
            if reason is None and name in tones:
                reason = "tone/noise"
            if reason is None and len(probe_text(text).split()) < cfg.min_words:
                reason = "too few words"
        audio_name = name if name in item.audio else None
        if audio_name is None and len(by_lower.get(name.lower(), [])) == 1:
            audio_name = by_lower[name.lower()][0]
        if audio_name is not None:
            used.add(audio_name)
        if reason is None and audio_name is None:
            reason = "no audio"
            item.no_audio.append(name)
        if reason is not None:
            item.dropped[reason] += 1
            continue
        if audio_name != name:
            item.audio[name] = item.audio[audio_name]
        item.keep.append(name)
    unmatched = [name for name in item.audio if name not in used and name not in item.transcript.entries]
    if unmatched:
        item.dropped["audio without transcript"] += len(unmatched)


def _row_id(lang: str, name: str, used: set[str]) -> str:
    uid = f"{lang}-{name.replace('/', '-')}"
    if uid in used:  # 'a/b' and 'a-b' both exist: keep both, apart
        uid = f"{uid}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    used.add(uid)
    return uid


def import_prompts(cfg: PromptsConfig, out_dir: str | Path) -> Path:
    """Import the configured languages into `out_dir` (layout and rules in the module docstring); return all.jsonl."""
    out_dir = Path(out_dir)
    transcripts, folders = _check_installed(cfg)
    read = {lang: read_transcript(path, lang) for lang, path in transcripts.items()}
    usable = {lang: {name: text for name, (_, text) in t.entries.items() if text_reason(text, cfg.keep_annotated) is None}
              for lang, t in read.items()}
    tones = {name for t in read.values() for name, (_, text) in t.entries.items() if text and is_tone(text)}
    groups = text_groups(usable)

    items = {lang: _Language(lang, read[lang], folders[lang], _audio_files(folders[lang])) for lang in cfg.languages}
    for lang, item in items.items():
        item.dropped.update(item.transcript.dropped)
        _select(cfg, item, tones)
        for problem in item.transcript.problems[:5]:
            log.warn(f"{escape(problem)}; skipped and counted in import_report.json")
        if item.no_audio:
            shown = ", ".join(item.no_audio[:5]) + (", ..." if len(item.no_audio) > 5 else "")
            log.warn(f"{lang}: {len(item.no_audio)} transcript line(s) without audio in {escape(str(item.folder))} ({escape(shown)}); "
                     "skipped and counted in import_report.json")
    if cfg.max_prompts is not None:
        chosen = set(sorted({name for item in items.values() for name in item.keep})[: cfg.max_prompts])
        for item in items.values():
            item.dropped["beyond max_prompts"] += sum(name not in chosen for name in item.keep)
            item.keep = [name for name in item.keep if name in chosen]
    if not any(item.keep for item in items.values()):
        raise UsageError(f"languages {cfg.languages}: no prompt passes the filters (min_words={cfg.min_words}, "
                         f"keep_digits={cfg.keep_digits}, keep_letters={cfg.keep_letters}); lower min_words or keep more")

    todo = _check_audio(items, out_dir)  # every file to (re)write, read and checked before anything is written
    entries, sentences, counts = _write_audio(cfg, items, todo, out_dir, usable, groups)
    return _write_corpus(cfg, out_dir, items, entries, sentences, counts, read, groups)


def _target(out_dir: Path, lang: str, name: str) -> Path:
    return out_dir / "audio" / lang / f"{name}.wav"


def _check_audio(items: dict[str, _Language], out_dir: Path) -> dict[tuple[str, str], np.ndarray]:
    """The decoded samples of every kept prompt whose wav is missing or does not match its source (two samples a
    G.722 byte); the first corrupt source is a UsageError, raised before any file is written."""
    pending = [(lang, name) for lang, item in items.items() for name in item.keep
               if _written_frames(_target(out_dir, lang, name)) != 2 * item.audio[name].stat().st_size]
    todo: dict[tuple[str, str], np.ndarray] = {}
    with log.progress() as bar:
        task = bar.add_task(f"decoding {len(pending)} G.722 files", total=len(pending))
        for lang, name in pending:
            path = items[lang].audio[name]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise RuntimeFailure(f"{path}: cannot read ({exc.strerror or exc}); check the file's permissions") from exc
            todo[(lang, name)] = decode_g722(data, str(path), lang)
            bar.advance(task)
    return todo


def _write_audio(cfg: PromptsConfig, items: dict[str, _Language], todo: dict[tuple[str, str], np.ndarray], out_dir: Path,
                 usable: dict[str, dict[str, str]], groups: dict[str, str]) -> tuple[list[ManifestEntry], list[dict], dict]:
    """Write the pending wavs; the manifest entries, sentences rows and per-language written/resumed counts."""
    entries: list[ManifestEntry] = []
    sentences: list[dict] = []
    counts: dict[str, Counter] = {lang: Counter() for lang in items}
    used_ids: set[str] = set()
    for lang, item in items.items():
        voice = VOICES[lang]
        source = f"asterisk-core-sounds-{lang}-g722 {package_version(cfg.doc_root, f'asterisk-core-sounds-{lang}-g722')}"
        for name in item.keep:
            target = _target(out_dir, lang, name)
            samples = todo.pop((lang, name), None)
            if samples is None:
                frames = _written_frames(target)
                counts[lang]["resumed"] += 1
            else:
                with atomic_path(target) as tmp:
                    sf.write(str(tmp), samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
                frames = samples.size
                counts[lang]["written"] += 1
            text = item.transcript.entries[name][1]
            translations = {other: usable[other][name] for other in sorted(usable) if name in usable[other]}
            translation = translations.get(cfg.translation_of(lang), "")
            split = split_of(groups.get(name, name), cfg.split_seed, cfg.dev_fraction, cfg.test_fraction)
            sentence_id = f"{lang}/{name}"
            entries.append(ManifestEntry(
                id=_row_id(lang, name, used_ids), audio_filepath=target.absolute(), duration=round(frames / SAMPLE_RATE, 4),
                text=text, split=split, language=lang, speaker_id=item.folder.name, source=source,
                extra={"licence": voice.licence, "prompt": name, "sentence_id": sentence_id, "translation": translation,
                       "translations": translations}))
            sentences.append({"sentence_id": sentence_id, "split": split, "text": text, "translation": translation,
                              "translation_language": cfg.translation_of(lang), "translations": translations,
                              "language": lang, "prompt": name})
    return entries, sentences, counts


def _write_corpus(cfg: PromptsConfig, out_dir: Path, items: dict[str, _Language], entries: list[ManifestEntry],
                  sentences: list[dict], counts: dict[str, Counter], read: dict[str, Transcript],
                  groups: dict[str, str]) -> Path:
    """The split manifests, sentences.jsonl, import_report.json, the resolved config, and all.jsonl last."""
    write_split_manifests(out_dir, entries, SPLITS)
    write_jsonl(out_dir / "sentences.jsonl", sentences)
    report = build_report(cfg, items, entries, counts, read, groups)
    write_json(out_dir / "import_report.json", report)
    write_text(out_dir / "resolved_config.yaml", to_yaml(cfg))
    manifest = write_manifest(out_dir / "all.jsonl", entries)
    stats = summarize(entries)
    log.info(f"wrote {stats['utterances']} utterances ({stats['hours'] * 60:.1f} min) to {escape(str(manifest))}: "
             + ", ".join(f"{lang} {per['utterances']}" for lang, per in report["languages"].items()))
    return manifest


def build_report(cfg: PromptsConfig, items: dict[str, _Language], entries: list[ManifestEntry], counts: dict[str, Counter],
                 read: dict[str, Transcript], groups: dict[str, str]) -> dict[str, Any]:
    """import_report.json: per language the packages, licence, speaker, counts and drops; the splits overall."""
    languages = {}
    for lang, item in items.items():
        mine = [entry for entry in entries if entry.language == lang]
        voice = VOICES[lang]
        languages[lang] = {
            "package": f"asterisk-core-sounds-{lang}", "audio_package": f"asterisk-core-sounds-{lang}-g722",
            "source": mine[0].source if mine else "", "licence": voice.licence, "recorded_by": voice.recorded_by,
            "speaker_id": item.folder.name, "transcript": str(item.transcript.path), "sound_folder": str(item.folder),
            "transcript_entries": len(item.transcript.entries) + sum(item.transcript.dropped.values()),
            "audio_files": len({path for path in item.audio.values()}),
            "utterances": len(mine), "minutes": round(sum(entry.duration for entry in mine) / 60, 2),
            "speakers": len({entry.speaker_id for entry in mine}),
            "written": counts[lang]["written"], "resumed": counts[lang]["resumed"],
            "splits": {split: sum(entry.split == split for entry in mine) for split in SPLITS},
            "translation_language": cfg.translation_of(lang),
            "without_translation": sum(not entry.extra["translation"] for entry in mine),
            "dropped": {reason: item.dropped[reason] for reason in DROP_REASONS if item.dropped[reason]},
        }
    prompts = {entry.extra["prompt"] for entry in entries}
    joined = Counter(groups.get(name, name) for name in prompts)
    return {
        "corpus": "Asterisk core sounds (Debian packages asterisk-core-sounds-XX, -XX-g722)",
        "sounds_root": cfg.sounds_root, "doc_root": cfg.doc_root,
        "transcripts_read": sorted(read),
        "total": {"utterances": len(entries), "minutes": round(sum(entry.duration for entry in entries) / 60, 2),
                  "prompts": len(prompts), "prompt_groups": len(joined),
                  "prompts_in_shared_text_groups": sum(n for n in joined.values() if n > 1)},
        "splits": {split: {"prompts": len({e.extra["prompt"] for e in entries if e.split == split}),
                           "utterances": sum(e.split == split for e in entries)} for split in SPLITS},
        "languages": languages,
    }
