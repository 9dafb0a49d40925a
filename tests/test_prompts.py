"""speechless.data.prompts: Debian's Asterisk prompts, on a fake installed tree the tests build (transcripts .txt.gz,
G.722 files encoded here) and on the real packages when they are installed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechless.core.config import load_config
from speechless.core.errors import UsageError
from speechless.core.metrics import probe_text
from speechless.data import prompts
from speechless.data.audio import SAMPLE_RATE
from speechless.data.manifest import read_manifest, validate_manifest
from speechless.data.prompts import PromptsConfig, import_prompts, is_misencoded, is_tone, split_of, text_groups

ROOT = Path(__file__).resolve().parents[1]
NUMBERED = 40
"""Prompts p00..p39 ("Prompt number N here."), enough for every split to get some."""

EN = """; Core Asterisk Sounds in English (fake)

agent-pass: Please enter your password followed by the pound key.
beep: [this is a simple beep tone]
calling: Calling.
conf-muted: You are now muted.
confbridge-muted: You are now muted.
digits/1: one
letters/a: a
vm-intro: Please leave your message after the tone. (simple tone sound plays)
missing-audio: This prompt has no audio file.
dictate/pause: Dictation is paused now.
this line has no colon
"""
FR = """\ufeff; Core Asterisk Sounds in French (fake)
agent-pass: Composez votre mot de passe suivi du dièse.
beep: un bip
calling: Appel en cours.
conf-muted: Vous êtes en sourdine.
confbridge-muted: Sourdine activée maintenant.
digits/1: un
letters/a: a
vm-intro: Laissez votre message après le timbre sonore.
dir-welcome:
dictate/pause: La dictée est en pause.
agent-pass: une deuxième ligne pour le même nom
"""
AUDIO = {"en": ["agent-pass", "beep", "calling", "conf-muted", "confbridge-muted", "digits/1", "letters/a", "vm-intro",
                "dictate/pause"],
         "fr": ["agent-pass", "beep", "calling", "conf-muted", "confbridge-muted", "digits/1", "letters/a", "vm-intro",
                "dir-welcome", "dictate/pause", "orphan"]}


def g722_bytes(seconds: float, freq: float = 300.0) -> bytes:
    import G722

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    samples = (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    return G722.G722(SAMPLE_RATE, 64000).encode(samples)


def make_tree(root: Path, languages=("en", "fr")) -> dict[str, str]:
    """A fake installed tree under `root`: doc/ (transcripts, changelogs) and sounds/ (G.722); the config overrides."""
    texts = {"en": EN + "".join(f"p{i:02d}: Prompt number {i} here.\n" for i in range(NUMBERED)),
             "fr": FR + "".join(f"p{i:02d}: Invite numéro {i} ici.\n" for i in range(NUMBERED))}
    numbered = [f"p{i:02d}" for i in range(NUMBERED)]
    for lang in languages:
        doc = root / "doc" / f"asterisk-core-sounds-{lang}"
        doc.mkdir(parents=True)
        (doc / f"core-sounds-{lang}.txt.gz").write_bytes(gzip.compress(texts[lang].encode("utf-8")))
        audio_doc = root / "doc" / f"asterisk-core-sounds-{lang}-g722"
        audio_doc.mkdir(parents=True)
        (audio_doc / "changelog.Debian.gz").write_bytes(
            gzip.compress(b"asterisk-core-sounds (1.6.1-1) unstable; urgency=medium\n\n  * fake\n"))
        folder = root / "sounds" / prompts.VOICES[lang].locale
        for number, name in enumerate(AUDIO[lang] + numbered):
            path = folder / f"{name}.g722"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(g722_bytes(0.2 + 0.01 * (number % 5), 250 + 10 * number))
    return {"sounds_root": str(root / "sounds"), "doc_root": str(root / "doc")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, str]:
    return make_tree(tmp_path_factory.mktemp("installed"))


def config(tree: dict[str, str], **extra) -> PromptsConfig:
    return PromptsConfig(**{"languages": ["en", "fr"], **tree, **extra})


@pytest.fixture(scope="module")
def imported(tree, tmp_path_factory) -> Path:
    return import_prompts(config(tree), tmp_path_factory.mktemp("out") / "prompts")


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------------- rows


def test_rows_fields_and_audio(imported):
    out = imported.parent
    rows = rows_of(imported)
    assert validate_manifest(imported, check_audio=True) == []
    by_id = {row["id"]: row for row in rows}
    row = by_id["en-agent-pass"]
    assert row["text"] == "Please enter your password followed by the pound key."
    assert row["audio_filepath"] == "audio/en/agent-pass.wav" and row["language"] == "en"
    assert row["speaker_id"] == "en_US_f_Allison" and row["source"] == "asterisk-core-sounds-en-g722 1.6.1-1"
    assert row["licence"] == "CC-BY-SA-3.0" and row["prompt"] == "agent-pass" and row["sentence_id"] == "en/agent-pass"
    assert by_id["fr-agent-pass"]["speaker_id"] == "fr_CA_f_June"
    assert by_id["en-dictate-pause"]["audio_filepath"] == "audio/en/dictate/pause.wav"  # a folder in the name
    info = sf.info(str(out / row["audio_filepath"]))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    assert row["duration"] == pytest.approx(info.frames / SAMPLE_RATE) and 0.19 < row["duration"] < 0.3
    for split in ("train", "dev", "test"):
        assert {r["id"] for r in rows_of(out / f"{split}.jsonl")} == {r["id"] for r in rows if r["split"] == split}
    sentences = {s["sentence_id"]: s for s in rows_of(out / "sentences.jsonl")}
    assert set(sentences) == {r["sentence_id"] for r in rows}
    s = sentences["fr/agent-pass"]
    assert s["text"] == "Composez votre mot de passe suivi du dièse." and s["language"] == "fr" and s["prompt"] == "agent-pass"
    assert s["split"] == by_id["fr-agent-pass"]["split"]
    assert (out / "resolved_config.yaml").is_file() and not list(out.rglob(".*.tmp"))


def test_translations_are_the_same_prompt_in_the_other_language(imported, tree, tmp_path):
    by_id = {row["id"]: row for row in rows_of(imported)}
    en, fr = by_id["en-agent-pass"], by_id["fr-agent-pass"]
    assert en["translation"] == fr["text"] and fr["translation"] == en["text"]  # en rows: english_translation_language fr
    assert en["translations"] == fr["translations"] == {"en": en["text"], "fr": fr["text"]}
    assert by_id["fr-vm-intro"]["translation"] == ""  # the English text holds a note: no usable translation
    flipped = import_prompts(config(tree, languages=["fr"], translation_language="fr", english_translation_language="en"),
                             tmp_path / "flipped")
    assert {row["id"]: row for row in rows_of(flipped)}["fr-agent-pass"]["translation"] == en["text"]


# ---------------------------------------------------------------------------------------------------------- drops


def test_drops_are_counted_by_reason(imported, capsys):
    report = json.loads((imported.parent / "import_report.json").read_text())
    en, fr = report["languages"]["en"], report["languages"]["fr"]
    assert en["dropped"] == {"unparsable line": 1, "digits": 1, "letters": 1, "tone/noise": 1, "note in brackets": 1,
                             "too few words": 1, "no audio": 1}
    # beep is a tone in English, so the same sound is dropped in French although its text says "un bip"
    assert fr["dropped"] == {"duplicate line": 1, "digits": 1, "letters": 1, "empty transcript": 1, "tone/noise": 1,
                             "audio without transcript": 1}
    ids = {row["id"] for row in rows_of(imported)}
    assert {"en-beep", "fr-beep", "en-calling", "en-digits-1", "en-letters-a", "en-vm-intro"}.isdisjoint(ids)
    assert {"fr-calling", "fr-vm-intro"} <= ids  # three words; no note in the French text
    assert en["utterances"] == NUMBERED + 4 and fr["utterances"] == NUMBERED + 6
    assert en["speakers"] == 1 and en["transcript_entries"] == 51 and en["audio_files"] == NUMBERED + len(AUDIO["en"])
    assert en["minutes"] == pytest.approx(sum(r["duration"] for r in rows_of(imported) if r["language"] == "en") / 60, abs=0.01)
    assert report["total"]["utterances"] == en["utterances"] + fr["utterances"]
    assert en["licence"] == "CC-BY-SA-3.0" and en["recorded_by"] == "Allison Smith"


def test_transcript_line_without_audio_is_a_warning_not_an_error(tree, tmp_path, capsys):
    import_prompts(config(tree, languages=["en"]), tmp_path / "out")
    err = " ".join(capsys.readouterr().err.split())
    assert "1 transcript line(s) without audio" in err and "missing-audio" in err


def test_translation_language_not_installed_is_a_warning(tmp_path, capsys):
    tree = make_tree(tmp_path / "installed", languages=("en",))
    manifest = import_prompts(PromptsConfig(languages=["en"], **tree), tmp_path / "out")
    err = " ".join(capsys.readouterr().err.split())
    assert "english_translation_language 'fr'" in err and "apt-get install asterisk-core-sounds-fr" in err
    rows = rows_of(manifest)
    assert rows and all(row["translation"] == "" and set(row["translations"]) == {"en"} for row in rows)
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())["languages"]["en"]
    assert report["without_translation"] == len(rows) and report["translation_language"] == "fr"


def test_keep_digits_letters_and_min_words(tree, tmp_path):
    manifest = import_prompts(config(tree, languages=["en"], keep_digits=True, keep_letters=True, min_words=1),
                              tmp_path / "out")
    ids = {row["id"] for row in rows_of(manifest)}
    assert {"en-digits-1", "en-letters-a", "en-calling"} <= ids and "en-beep" not in ids


def test_text_rules():
    assert is_tone("[ascending tones]") and is_tone(" (beep) ") and is_tone("<beep ascending>")
    assert not is_tone("Voce disattivata. (You are now muted.)") and not is_tone("activated")
    for bad in ("il tempo sar? esattamente", "La conferenza ? piena.", "non pu?essere", "caf\ufffd"):
        assert is_misencoded(bad), bad
    for good in ("In quale cartella devo salvare il messaggio?", "Casella di posta? Prego", "Thank you."):
        assert not is_misencoded(good), good


# ---------------------------------------------------------------------------------------------------------- splits


def test_split_by_prompt_is_the_same_in_every_language(imported):
    rows = rows_of(imported)
    split_of_prompt: dict[str, set[str]] = {}
    for row in rows:
        split_of_prompt.setdefault(row["prompt"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_prompt.values())
    assert {s for splits in split_of_prompt.values() for s in splits} == {"train", "dev", "test"}
    trained = {row["prompt"] for row in rows if row["split"] == "train"}
    tested = {row["prompt"] for row in rows if row["split"] == "test"}
    assert trained.isdisjoint(tested)
    # no test text, nor its translation, is trained in any language (after the scorer's normalisation)
    train_texts = {probe_text(t) for row in rows if row["split"] == "train" for t in row["translations"].values()}
    assert not {probe_text(t) for row in rows if row["split"] == "test" for t in row["translations"].values()} & train_texts
    # the two prompts saying "You are now muted." are one group
    assert split_of_prompt["conf-muted"] == split_of_prompt["confbridge-muted"]


def test_split_hash_and_groups():
    names = [f"n{i}" for i in range(2000)]
    shares = [split_of(name, 0, 0.1, 0.15) for name in names]
    assert 0.12 < shares.count("test") / len(names) < 0.18 and 0.07 < shares.count("dev") / len(names) < 0.13
    assert shares != [split_of(name, 1, 0.1, 0.15) for name in names]  # the seed matters
    groups = text_groups({"en": {"a": "Same words.", "b": "same words", "c": "other"}, "fr": {"c": "x y", "d": "X, y!"}})
    assert groups == {"a": "a", "b": "a", "c": "c", "d": "c"}


# ---------------------------------------------------------------------------------------------------------- resume


def test_rerun_resumes_without_decoding_and_redoes_a_bad_wav(tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = rows_of(import_prompts(config(tree, languages=["en"]), out))
    (out / "audio/en/agent-pass.wav").write_bytes(b"RIFF broken")  # a wav that is no longer valid
    decoded = []
    real = prompts.decode_g722
    monkeypatch.setattr(prompts, "decode_g722", lambda data, name, lang: decoded.append(name) or real(data, name, lang))
    second = rows_of(import_prompts(config(tree, languages=["en"]), out))
    assert second == first and [Path(name).name for name in decoded] == ["agent-pass.g722"]
    report = json.loads((out / "import_report.json").read_text())["languages"]["en"]
    assert (report["written"], report["resumed"]) == (1, len(first) - 1)


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("content, why", [(b"", "empty G.722 file"), (b"RIFF\x00\x00\x00\x00WAVEfmt ", "not raw G.722"),
                                          (b"this is a text file, not audio at all; " * 4, "holds text")])
def test_corrupt_g722_is_one_line_naming_the_file_and_writes_nothing(tmp_path, cli, content, why):
    tree = make_tree(tmp_path / "installed", languages=("en",))
    bad = Path(tree["sounds_root"]) / "en_US_f_Allison" / "p07.g722"
    bad.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(UsageError) as caught:
        import_prompts(PromptsConfig(languages=["en"], **tree), out)
    message = str(caught.value)
    assert str(bad) in message and why in message and "\n" not in message
    assert not out.exists()  # every source is checked before anything is written
    result = cli("data", "prompts", "--out", out, "--set", "languages=[en]", "--set", f"sounds_root={tree['sounds_root']}",
                 "--set", f"doc_root={tree['doc_root']}")
    assert result.exit_code == 2 and "p07.g722" in result.stderr and not out.exists()


def test_missing_package_names_what_to_install(tree, tmp_path, cli):
    with pytest.raises(UsageError, match=r"asterisk-core-sounds-es is not installed.*apt-get install asterisk-core-sounds-es "
                                         r"asterisk-core-sounds-es-g722") as caught:
        import_prompts(config(tree, languages=["en", "es"]), tmp_path / "out")
    assert "\n" not in str(caught.value)
    no_audio = make_tree(tmp_path / "no_audio", languages=("en", "fr"))
    import shutil

    shutil.rmtree(Path(no_audio["sounds_root"]) / "fr_CA_f_June")
    with pytest.raises(UsageError, match="asterisk-core-sounds-fr-g722 is not installed"):
        import_prompts(PromptsConfig(languages=["fr"], **no_audio), tmp_path / "out")
    result = cli("data", "prompts", "--out", tmp_path / "out", "--set", "languages=[es]",
                 "--set", f"sounds_root={tree['sounds_root']}", "--set", f"doc_root={tree['doc_root']}")
    assert result.exit_code == 2 and "apt-get install asterisk-core-sounds-es" in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def test_config_rejects_bad_settings():
    with pytest.raises(UsageError, match="english_translation_language"):
        load_config(PromptsConfig, None, ["english_translation_language=en"])
    with pytest.raises(UsageError, match="languages"):
        load_config(PromptsConfig, None, ["languages=[de]"])
    with pytest.raises(UsageError, match="leave a share for train"):
        load_config(PromptsConfig, None, ["dev_fraction=0.5", "test_fraction=0.5"])


# ---------------------------------------------------------------------------------------------------------- CLI, pipeline


def test_cli_json_and_max_prompts(tree, tmp_path, cli):
    result = cli("data", "prompts", "--out", tmp_path / "out", "--set", "languages=[en, fr]", "--set", "max_prompts=5",
                 "--set", f"sounds_root={tree['sounds_root']}", "--set", f"doc_root={tree['doc_root']}", "--format", "json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    # the first 5 names kept in either language: agent-pass, calling (French only), conf-muted, confbridge-muted, dictate/pause
    languages = out["report"]["languages"]
    assert (languages["en"]["utterances"], languages["fr"]["utterances"], out["utterances"]) == (4, 5, 9)
    assert languages["fr"]["dropped"]["beyond max_prompts"] == NUMBERED + 6 - 5
    assert len(read_manifest(out["manifest"])) == 9


def test_pipeline_data_step_writes_the_corpus_with_its_sentences(tree, tmp_path):
    from speechless.llm.instructions import demo_conversations
    from speechless.pipeline import PipelineConfig, _data_configure, _data_execute

    cfg = PipelineConfig.model_validate({"data": {"source": "prompts", "prompts": {"languages": ["en", "fr"], **tree}}})
    folder = tmp_path / "run" / "corpus"
    assert _data_configure(cfg, folder, {}) == cfg.data.prompts
    summary = _data_execute(cfg, cfg.data.prompts, folder)
    manifest = Path(summary["manifest"])
    assert manifest == folder / "all.jsonl" and (folder / "sentences.jsonl").is_file()
    rows = rows_of(manifest)
    for row in rows:
        row["audio_filepath"] = str(folder / row["audio_filepath"])
    conversations = demo_conversations(folder / "sentences.jsonl", rows, "train", ["asr", "ast"], 1, 0)
    by_id = {c["id"]: c for c in conversations}
    assert by_id["fr-agent-pass/ast"]["messages"][-1]["content"] == "Please enter your password followed by the pound key."
    assert by_id["en-agent-pass/asr"]["messages"][-1]["content"] == "Please enter your password followed by the pound key."
    assert by_id["fr-agent-pass/ast"]["messages"][0]["content"][0]["text"].startswith("Translate the audio into English.")
    # English rows translate into French, and the instruction says so
    assert by_id["en-agent-pass/ast"]["messages"][0]["content"][0]["text"].startswith("Translate the audio into French.")


# ---------------------------------------------------------------------------------------------------------- real files


def test_install_script_installs_the_eight_packages():
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert "for lang in en fr es it; do" in script
    assert 'prompts="$prompts asterisk-core-sounds-$lang"' in script and 'prompts="$prompts asterisk-core-sounds-$lang-g722"' in script
    assert "core-sounds-$lang.txt.gz" in script and 'missing="$missing$prompts"' in script


REAL = prompts.transcript_path(prompts.DEFAULT_DOC_ROOT, "en").is_file() and \
    prompts.sound_folder(prompts.DEFAULT_SOUNDS_ROOT, "en").is_dir()


@pytest.mark.skipif(not REAL, reason="asterisk-core-sounds-en(-g722) not installed (scripts/install.sh installs them)")
def test_real_english_prompts(tmp_path):
    manifest = import_prompts(PromptsConfig(languages=["en"], max_prompts=12), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())["languages"]["en"]
    assert report["transcript_entries"] > 500 and report["audio_files"] > 500  # before any filter
    assert report["source"].startswith("asterisk-core-sounds-en-g722 ") and report["speaker_id"] == "en_US_f_Allison"
    assert report["dropped"]["tone/noise"] >= 4 and report["dropped"]["digits"] > 50
    rows = rows_of(manifest)
    assert len(rows) == 12 and all(0.5 < row["duration"] < 30 for row in rows)
    audio, rate = sf.read(str(manifest.parent / rows[0]["audio_filepath"]))
    assert rate == SAMPLE_RATE and 0.05 < np.abs(audio).max() <= 1.0
    if prompts.transcript_path(prompts.DEFAULT_DOC_ROOT, "fr").is_file():
        en = prompts.read_transcript(prompts.transcript_path(prompts.DEFAULT_DOC_ROOT, "en"), "en").entries
        fr = prompts.read_transcript(prompts.transcript_path(prompts.DEFAULT_DOC_ROOT, "fr"), "fr").entries
        assert len(set(en) & set(fr)) > 400  # a parallel corpus: the same prompt names
        assert sum(bool(row["translation"]) and row["translations"].get("fr") == row["translation"] for row in rows) >= 10


def test_model_cards_can_name_the_corpus_licences_and_packages(imported):
    from speechless.data.manifest import corpus_line, corpus_record

    record = corpus_record(imported)
    assert set(record["licences"]) <= {"CC-BY-SA-3.0", "CC-BY-3.0"} and record["licences"]
    assert all(source.startswith("asterisk-core-sounds-") for source in record["sources"])
    assert sum(record["sources"].values()) == len(rows_of(imported))
    line = corpus_line(record)
    assert "CC-BY-SA-3.0" in line and "asterisk-core-sounds-" in line and "\n" not in line
