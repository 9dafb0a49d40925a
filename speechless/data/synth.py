"""A synthetic speech corpus for demos and tests: template sentences (with English translations) spoken by espeak-ng.

Sentences come from a small deterministic grammar (subject, verb, object, place, time, tense), in Swahili (`sw`,
default; espeak-ng has no Twi voice) or English (`en`). Every sentence carries its English translation and its parts,
so later stages can build translation and instruction tasks from the same structure (`generate_sentences`).

Output layout of `synthesize_corpus(out_dir)`:

    out_dir/
      all.jsonl                     every utterance (the returned manifest)
      train.jsonl dev.jsonl test.jsonl   the same rows, one file per non-empty split
      sentences.jsonl               one row per sentence: sentence_id, split, text, translation and its parts
      audio/<voice>/<sentence_id>-<hash>.wav   16 kHz mono PCM-16 (hash of text + voice settings)
      resolved_config.yaml          the settings used

Splits are BY SENTENCE (a sentence's text is in exactly one split); every voice speaks every sentence, or with
`voices_per_sentence` k, k voices in turn. Re-running with the same settings skips audio already written (files
appear atomically, so an interrupted run resumes).
Manifest rows carry two extra fields: `translation` (English) and `sentence_id`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import soxr
from pydantic import Field, field_validator, model_validator
from rich.markup import escape

from speechless.core import log
from speechless.core.config import Section, to_yaml
from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import atomic_path, write_jsonl, write_text
from speechless.data.audio import SAMPLE_RATE, written_duration
from speechless.data.manifest import ManifestEntry, summarize, write_manifest, write_split_manifests

ESPEAK = "espeak-ng"
SPLITS = ("train", "dev", "test")
SOURCE = "synthetic:espeak-ng"

# ---------------------------------------------------------------------------------------------------------------
# Grammar. Each lexical item is (Swahili, English). Swahili verbs agree with the subject (ni-/tu-/a-/wa-) and take a
# tense marker (-na- present, -li- past, -ta- future); one-syllable roots (-la, -nywa) keep the infinitive ku-.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    sw: str
    en: str
    prefix: str  # Swahili subject prefix: ni (I), tu (we), a (he/she), wa (they)

    @property
    def be(self) -> str:
        return {"ni": "am", "a": "is"}.get(self.prefix, "are")


@dataclass(frozen=True)
class Verb:
    root: str  # Swahili root, e.g. "pika"
    en: str  # English base form, e.g. "cook" (a particle stays attached: "look for")
    en_past: str
    en_ing: str
    objects: tuple[str, ...]  # keys into OBJECTS
    places: tuple[str, ...]  # keys into PLACES
    monosyllabic: bool = False


SUBJECTS: tuple[Subject, ...] = (
    Subject("Mimi", "I", "ni"),
    Subject("Sisi", "We", "tu"),
    Subject("Mama", "Mother", "a"),
    Subject("Baba", "Father", "a"),
    Subject("Mtoto", "The child", "a"),
    Subject("Mwalimu", "The teacher", "a"),
    Subject("Daktari", "The doctor", "a"),
    Subject("Mkulima", "The farmer", "a"),
    Subject("Bibi", "Grandmother", "a"),
    Subject("Babu", "Grandfather", "a"),
    Subject("Dada yangu", "My sister", "a"),
    Subject("Kaka yangu", "My brother", "a"),
    Subject("Rafiki yangu", "My friend", "a"),
    Subject("Mwanafunzi", "The student", "a"),
    Subject("Watoto", "The children", "wa"),
    Subject("Walimu", "The teachers", "wa"),
    Subject("Wakulima", "The farmers", "wa"),
    Subject("Wanafunzi", "The students", "wa"),
    Subject("Wazazi", "The parents", "wa"),
)

OBJECTS: dict[str, tuple[str, str]] = {
    "chakula": ("chakula", "food"),
    "wali": ("wali", "rice"),
    "ugali": ("ugali", "ugali"),
    "maharage": ("maharage", "beans"),
    "samaki": ("samaki", "fish"),
    "mkate": ("mkate", "bread"),
    "matunda": ("matunda", "fruit"),
    "ndizi": ("ndizi", "bananas"),
    "maziwa": ("maziwa", "milk"),
    "maji": ("maji", "water"),
    "chai": ("chai", "tea"),
    "viatu": ("viatu", "shoes"),
    "nguo": ("nguo", "clothes"),
    "kitabu": ("kitabu", "a book"),
    "barua": ("barua", "a letter"),
    "gazeti": ("gazeti", "the newspaper"),
    "hadithi": ("hadithi", "a story"),
    "vyombo": ("vyombo", "the dishes"),
    "gari": ("gari", "the car"),
    "nyumba": ("nyumba", "the house"),
    "chumba": ("chumba", "the room"),
    "ukuta": ("ukuta", "a wall"),
    "shamba": ("shamba", "the farm"),
    "mzigo": ("mzigo", "a load"),
    "ufunguo": ("ufunguo", "the key"),
    "kazi": ("kazi", "work"),
    "redio": ("redio", "the radio"),
    "muziki": ("muziki", "music"),
    "wimbo": ("wimbo", "a song"),
    "picha": ("picha", "a picture"),
}

PLACES: dict[str, tuple[str, str]] = {
    "nyumbani": ("nyumbani", "at home"),
    "jikoni": ("jikoni", "in the kitchen"),
    "sokoni": ("sokoni", "at the market"),
    "dukani": ("dukani", "at the shop"),
    "mjini": ("mjini", "in town"),
    "shuleni": ("shuleni", "at school"),
    "darasani": ("darasani", "in the classroom"),
    "kijijini": ("kijijini", "in the village"),
    "mtoni": ("mtoni", "at the river"),
    "kanisani": ("kanisani", "at church"),
}

VERBS: tuple[Verb, ...] = (
    Verb("pika", "cook", "cooked", "cooking", ("chakula", "wali", "ugali", "maharage", "samaki"), ("nyumbani", "jikoni")),
    Verb("nunua", "buy", "bought", "buying",
         ("mkate", "matunda", "samaki", "viatu", "kitabu", "maziwa", "nguo"), ("sokoni", "dukani", "mjini")),
    Verb("soma", "read", "read", "reading", ("kitabu", "barua", "gazeti", "hadithi"), ("nyumbani", "shuleni", "darasani")),
    Verb("nywa", "drink", "drank", "drinking", ("maji", "chai", "maziwa"), ("nyumbani", "jikoni"), monosyllabic=True),
    Verb("la", "eat", "ate", "eating",
         ("chakula", "wali", "ndizi", "mkate", "samaki", "matunda", "maharage"), ("nyumbani", "shuleni"), monosyllabic=True),
    Verb("andika", "write", "wrote", "writing", ("barua", "hadithi"), ("shuleni", "darasani", "nyumbani")),
    Verb("osha", "wash", "washed", "washing", ("vyombo", "gari"), ("nyumbani", "jikoni", "mtoni")),
    Verb("fua", "wash", "washed", "washing", ("nguo",), ("nyumbani", "mtoni")),
    Verb("safisha", "clean", "cleaned", "cleaning", ("nyumba", "chumba", "gari"), ()),
    Verb("jenga", "build", "built", "building", ("nyumba", "ukuta"), ("kijijini", "mjini")),
    Verb("lima", "cultivate", "cultivated", "cultivating", ("shamba",), ("kijijini",)),
    Verb("beba", "carry", "carried", "carrying", ("maji", "mzigo"), ("sokoni", "kijijini")),
    Verb("uza", "sell", "sold", "selling", ("samaki", "matunda", "mkate", "nguo", "maziwa"), ("sokoni", "dukani", "mjini")),
    Verb("tafuta", "look for", "looked for", "looking for", ("ufunguo", "kazi", "kitabu"), ("nyumbani", "mjini")),
    Verb("sikiliza", "listen to", "listened to", "listening to", ("redio", "muziki", "hadithi"), ("nyumbani",)),
    Verb("imba", "sing", "sang", "singing", ("wimbo",), ("shuleni", "kanisani")),
    Verb("chora", "draw", "drew", "drawing", ("picha",), ("shuleni", "darasani")),
)

TENSES: dict[str, str] = {"present": "na", "past": "li", "future": "ta"}

# Time adverbs allowed per tense ("" = none).
TIMES: dict[str, tuple[tuple[str, str], ...]] = {
    "present": (("", ""), ("sasa", "now"), ("leo", "today"), ("asubuhi", "in the morning"), ("jioni", "in the evening")),
    "past": (("", ""), ("jana", "yesterday"), ("juzi", "the day before yesterday"),
             ("asubuhi", "in the morning"), ("jioni", "in the evening")),
    "future": (("", ""), ("kesho", "tomorrow"), ("baadaye", "later"), ("asubuhi", "in the morning"), ("jioni", "in the evening")),
}


@dataclass(frozen=True)
class Sentence:
    """A generated sentence: `text` in `language`, `translation` in English, and its parts (English glosses)."""

    text: str
    translation: str
    language: str
    subject: str
    verb: str
    object: str
    tense: str
    place: str = ""
    time: str = ""


def _swahili_verb(subject: Subject, verb: Verb, tense: str) -> str:
    return subject.prefix + TENSES[tense] + ("ku" if verb.monosyllabic else "") + verb.root


def _english_verb(subject: Subject, verb: Verb, tense: str) -> str:
    if tense == "present":
        return f"{subject.be} {verb.en_ing}"
    if tense == "past":
        return verb.en_past
    return f"will {verb.en}"


def _compose(subject: Subject, verb: Verb, obj: str, tense: str, place: str, time: tuple[str, str], language: str) -> Sentence:
    obj_sw, obj_en = OBJECTS[obj]
    place_sw, place_en = PLACES[place] if place else ("", "")
    time_sw, time_en = time
    sw_words = [subject.sw, _swahili_verb(subject, verb, tense), obj_sw, place_sw, time_sw]
    en_words = [subject.en, _english_verb(subject, verb, tense), obj_en, place_en, time_en]
    swahili = " ".join(word for word in sw_words if word) + "."
    english = " ".join(word for word in en_words if word) + "."
    return Sentence(
        text=swahili if language == "sw" else english,
        translation=english,
        language=language,
        subject=subject.en,
        verb=verb.en,
        object=obj_en,
        tense=tense,
        place=place_en,
        time=time_en,
    )


def _all_combinations() -> list[tuple]:
    combos = []
    for subject, verb in product(SUBJECTS, VERBS):
        for obj, tense in product(verb.objects, TENSES):
            for place, time in product(("",) + verb.places, TIMES[tense]):
                combos.append((subject, verb, obj, tense, place, time))
    return combos


LANGUAGES = ("sw", "en")


def generate_sentences(n: int, seed: int = 0, language: str = "sw") -> list[Sentence]:
    """`n` distinct sentences (and their English translations), the same for the same (n, seed, language).

    Sampling is a seeded shuffle of every grammatical combination, then a prefix: the first k sentences for a larger
    n are exactly the sentences for n = k (same seed and language).
    """
    if language not in LANGUAGES:
        raise UsageError(f"language {language!r}: the sentence grammar supports {', '.join(LANGUAGES)}")
    combos = _all_combinations()
    if not 0 < n <= len(combos):
        raise UsageError(f"num_sentences={n}: expected 1 to {len(combos)} (the grammar's distinct sentences)")
    rng = random.Random(seed)
    rng.shuffle(combos)
    sentences: list[Sentence] = []
    seen: set[str] = set()
    for combo in combos:
        sentence = _compose(*combo, language=language)
        key = sentence.text if language == "sw" else sentence.text.lower()
        if key not in seen:
            seen.add(key)
            sentences.append(sentence)
            if len(sentences) == n:
                break
    return sentences


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


class VoiceConfig(Section):
    """One synthetic speaker: an espeak-ng voice variant with its own speed and pitch."""

    variant: str = "m1"
    """espeak-ng voice variant (m1-m8, f1-f5, or any name from `espeak-ng --voices=variant`)."""
    speed: int = Field(default=150, ge=80, le=450)
    """Speaking rate in words per minute (espeak-ng -s)."""
    pitch: int = Field(default=50, ge=0, le=99)
    """Base pitch 0-99 (espeak-ng -p)."""
    name: str = ""
    """Speaker id in the manifest and audio folder name; defaults to the variant."""

    @field_validator("variant", "name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if value and not all(ch.isalnum() or ch in "-_" for ch in value):
            raise ValueError("use letters, digits, '-' and '_' only")
        return value

    @property
    def label(self) -> str:
        return self.name or self.variant


DEFAULT_VOICES = [
    VoiceConfig(variant="m1", speed=145, pitch=45),
    VoiceConfig(variant="m3", speed=130, pitch=35),
    VoiceConfig(variant="m7", speed=155, pitch=55),
    VoiceConfig(variant="f2", speed=140, pitch=60),
    VoiceConfig(variant="f4", speed=130, pitch=70),
    VoiceConfig(variant="f5", speed=150, pitch=65),
]


class SynthConfig(Section):
    """`speechless data synth`: a synthetic corpus spoken by espeak-ng voices."""

    language: Literal["sw", "en"] = "sw"
    """Language of the sentences and the espeak-ng voice: sw (Swahili) or en (English)."""
    num_sentences: int = Field(default=400, ge=1)
    """Distinct sentences to generate."""
    voices_per_sentence: int | None = Field(default=None, ge=1)
    """How many of the voices speak each sentence, taken in turn (sentence i by voices i*k .. i*k+k-1, modulo the
    number of voices) so every voice gets the same share; None = every voice speaks every sentence. At a fixed audio
    budget, fewer voices per sentence buy more distinct sentences."""
    seed: int = 0
    """Seed of the sentence sampling (same seed, same corpus)."""
    voices: list[VoiceConfig] = Field(default_factory=lambda: [voice.model_copy() for voice in DEFAULT_VOICES], min_length=1)
    """The speakers: espeak-ng variant, speed (words/min), pitch (0-99), optional name."""
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Shares of SENTENCES in train, dev, test (must sum to 1)."""
    workers: int = Field(default=2, ge=1, le=64)
    """espeak-ng processes run at once."""

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(share < 0 for share in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError("expected three shares >= 0 that sum to 1, e.g. [0.7, 0.15, 0.15]")
        return value

    @model_validator(mode="after")
    def _unique_voices(self) -> SynthConfig:
        labels = [voice.label for voice in self.voices]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"voices: name {duplicates[0]!r} used twice; give each voice a distinct 'name'")
        if self.voices_per_sentence is not None and self.voices_per_sentence > len(self.voices):
            raise ValueError(f"voices_per_sentence={self.voices_per_sentence} but only {len(self.voices)} voice(s) are listed; "
                             "lower it or add voices")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Synthesis
# ---------------------------------------------------------------------------------------------------------------


def find_espeak() -> str:
    """Path of the espeak-ng binary, or a UsageError saying how to install it."""
    found = shutil.which(ESPEAK)
    if found is None:
        raise UsageError(f"{ESPEAK} not found on PATH; install it: apt-get install espeak-ng")
    return found


@lru_cache(maxsize=4)
def _espeak_variants(binary: str) -> frozenset[str]:
    listing = subprocess.run([binary, "--voices=variant"], capture_output=True, text=True, check=False).stdout
    names = set()
    for line in listing.splitlines()[1:]:
        for token in line.split():
            if token.startswith("!v/"):
                names.add(token[3:])
    return frozenset(names)


def split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sentences per split: dev and test rounded (at least 1 when their share is > 0 and n >= 3), train the rest."""
    dev, test = (round(n * share) for share in ratios[1:])
    if n >= 3:
        dev = max(dev, 1) if ratios[1] > 0 else 0
        test = max(test, 1) if ratios[2] > 0 else 0
    dev, test = min(dev, n), min(test, n - min(dev, n))
    train = n - dev - test
    if ratios[0] > 0 and train == 0 and n >= 3:
        raise UsageError(f"split_ratios {list(ratios)}: leave at least one of {n} sentences for train")
    return train, dev, test


def sentence_voices(cfg: SynthConfig, index: int) -> list[VoiceConfig]:
    """The voices that speak sentence `index`: all of them, or `voices_per_sentence` taken in turn."""
    per_sentence = cfg.voices_per_sentence or len(cfg.voices)
    return [cfg.voices[(index * per_sentence + offset) % len(cfg.voices)] for offset in range(per_sentence)]


def _audio_name(sentence_id: str, sentence: Sentence, voice: VoiceConfig) -> str:
    key = json.dumps([sentence.language, sentence.text, voice.variant, voice.speed, voice.pitch])
    return f"{sentence_id}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.wav"


def _synthesize_one(binary: str, text: str, language: str, voice: VoiceConfig, target: Path) -> float:
    """Speak `text` into `target` (16 kHz mono PCM-16, atomically); return its duration in seconds."""
    fd, raw_name = tempfile.mkstemp(prefix=".espeak.", suffix=".wav", dir=target.parent)
    os.close(fd)
    raw = Path(raw_name)
    try:
        voice_args = ["-v", f"{language}+{voice.variant}", "-s", str(voice.speed), "-p", str(voice.pitch)]
        command = [binary, "-b", "1", *voice_args, "-w", str(raw), text]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0 or raw.stat().st_size <= 44:
            reason = (done.stderr or done.stdout).strip().splitlines()
            detail = reason[-1] if reason else "no output"
            raise RuntimeFailure(f"{ESPEAK} failed (exit {done.returncode}) on {text!r} with voice {voice.label}: {detail}")
        audio, rate = sf.read(str(raw), dtype="float32")
    finally:
        raw.unlink(missing_ok=True)
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    np.clip(audio, -1.0, 1.0, out=audio)
    with atomic_path(target) as tmp:
        sf.write(str(tmp), audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return audio.shape[0] / SAMPLE_RATE


def synthesize_corpus(
    out_dir: str | os.PathLike,
    *,
    language: str = "sw",
    voices: list[VoiceConfig | str] | None = None,
    num_sentences: int = 400,
    voices_per_sentence: int | None = None,
    seed: int = 0,
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    workers: int = 2,
) -> Path:
    """Generate sentences, speak each with every voice (or `voices_per_sentence` of them in turn), write audio and
    manifests under `out_dir`; return all.jsonl.

    `voices` are VoiceConfig objects or bare espeak-ng variant names ("m1", "f4"); None = the six default voices.
    Resumable: audio already written for the same text and voice settings is kept. See the module docstring for the
    folder layout.
    """
    voice_list = [VoiceConfig(variant=voice) if isinstance(voice, str) else voice for voice in (voices or DEFAULT_VOICES)]
    cfg = SynthConfig(
        language=language, num_sentences=num_sentences, voices_per_sentence=voices_per_sentence, seed=seed, voices=voice_list,
        split_ratios=tuple(split_ratios), workers=workers,
    )
    return synthesize_from_config(cfg, out_dir)


def synthesize_from_config(cfg: SynthConfig, out_dir: str | os.PathLike) -> Path:
    """`synthesize_corpus` driven by a validated SynthConfig (what `speechless data synth` calls)."""
    binary = find_espeak()
    _check_variants(binary, cfg.voices)
    out_dir = Path(out_dir)
    sentences = generate_sentences(cfg.num_sentences, cfg.seed, cfg.language)
    counts = split_counts(len(sentences), cfg.split_ratios)
    split_of = [split for split, count in zip(SPLITS, counts) for _ in range(count)]
    width = max(5, len(str(len(sentences) - 1)))
    sentence_ids = [f"{cfg.language}-{index:0{width}d}" for index in range(len(sentences))]

    jobs = []
    for index, sentence in enumerate(sentences):
        for voice in sentence_voices(cfg, index):
            path = out_dir / "audio" / voice.label / _audio_name(sentence_ids[index], sentence, voice)
            jobs.append((index, voice, path))
    for voice in cfg.voices:
        (out_dir / "audio" / voice.label).mkdir(parents=True, exist_ok=True)
    durations = _synthesize_jobs(binary, cfg, sentences, jobs, out_dir)

    entries = []
    for index, voice, path in jobs:
        sentence = sentences[index]
        entries.append(
            ManifestEntry(
                id=f"{sentence_ids[index]}-{voice.label}",
                audio_filepath=path.absolute(),
                duration=round(durations[path], 4),
                text=sentence.text,
                split=split_of[index],
                language=cfg.language,
                speaker_id=voice.label,
                source=SOURCE,
                extra={"translation": sentence.translation, "sentence_id": sentence_ids[index]},
            )
        )
    return _write_corpus(out_dir, cfg, entries, sentences, sentence_ids, split_of)


def _check_variants(binary: str, voices: list[VoiceConfig]) -> None:
    """Refuse a voice whose variant espeak-ng does not know (when it can list its variants)."""
    known = _espeak_variants(binary)
    for voice in voices:
        if known and voice.variant not in known:
            raise UsageError(
                f"voice variant {voice.variant!r} is not an espeak-ng variant; list them with `espeak-ng --voices=variant` "
                "(e.g. m1, m3, f2, f4)"
            )


def _synthesize_jobs(binary: str, cfg: SynthConfig, sentences: list[Sentence], jobs: list[tuple[int, VoiceConfig, Path]],
                     out_dir: Path) -> dict[Path, float]:
    """Durations of every job's audio: those already written are read back, the rest synthesized on `cfg.workers`
    threads."""
    durations: dict[Path, float] = {}
    todo = []
    for index, voice, path in jobs:
        existing = written_duration(path)
        if existing is None:
            todo.append((index, voice, path))
        else:
            durations[path] = existing
    if durations:
        log.info(f"resuming: {len(durations)} of {len(jobs)} utterances already synthesized in {escape(str(out_dir))}")

    with log.progress() as bar:
        task = bar.add_task(f"synthesizing {len(todo)} utterances", total=len(todo))
        pool = ThreadPoolExecutor(max_workers=cfg.workers)
        try:
            futures = {
                pool.submit(_synthesize_one, binary, sentences[index].text, cfg.language, voice, path): path
                for index, voice, path in todo
            }
            for future in as_completed(futures):
                durations[futures[future]] = future.result()
                bar.advance(task)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return durations


def _write_corpus(out_dir: Path, cfg: SynthConfig, entries: list[ManifestEntry], sentences: list[Sentence],
                  sentence_ids: list[str], split_of: list[str]) -> Path:
    """Write the split manifests, sentences.jsonl, the resolved config and all.jsonl; return all.jsonl."""
    write_split_manifests(out_dir, entries, SPLITS)
    write_jsonl(
        out_dir / "sentences.jsonl",
        [{"sentence_id": sentence_ids[i], "split": split_of[i], **asdict(sentence)} for i, sentence in enumerate(sentences)],
    )
    write_text(out_dir / "resolved_config.yaml", to_yaml(cfg))
    manifest = write_manifest(out_dir / "all.jsonl", entries)
    stats = summarize(entries)
    log.info(
        f"wrote {stats['utterances']} utterances ({stats['hours']:.2f} h) to {escape(str(manifest))}: "
        + ", ".join(f"{split} {s['utterances']} / {s['seconds']:.0f} s" for split, s in stats["splits"].items())
    )
    return manifest
