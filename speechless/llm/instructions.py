"""Instruction data for stage 3: conversations as JSONL, checked line by line, and the demo task set.

One conversation per line:
    {"id": "...", "task": "asr", "closed": false,
     "messages": [{"role": "user", "content": [{"type": "text", "text": "Transcribe the audio."},
                                               {"type": "speech", "text": "Watoto walichora picha.", "speaker": "m1",
                                                "utterance": "sw-00000-m1", "audio": "audio/m1/x.wav"}]},
                  {"role": "assistant", "content": "Watoto walichora picha."}]}
A user turn's `content` is a string or a list of parts; a `speech` part is spoken text: stage 2 turns its `text` into
synthetic tokens (in `speaker`'s voice), or, for the real-speech topline and evaluation, `utterance` names the stage-1
token row / `audio` the recording. Roles alternate user/assistant starting with the user; a training conversation
ends with an assistant turn. `closed` marks answers scored by exact match.
"""

from __future__ import annotations

import random
from pathlib import Path

from speechless.core.errors import UsageError
from speechless.core.io import read_jsonl

# The demo's tasks: (name, instruction, answer field of sentences.jsonl, closed answer)
DEMO_TASKS = {
    "asr": ("Transcribe the audio.", "text", False),
    "ast": ("Translate the audio into English.", "translation", False),
    "where": ("Where does it happen?", "place", True),
    "who": ("Who does it?", "subject", True),
}


LANGUAGE_NAMES = {"en": "English", "fr": "French", "es": "Spanish", "it": "Italian", "sw": "Swahili"}
"""Names of translation targets in the ast instruction (a sentence's `translation_language`; English by default)."""


def task_instruction(task: str, translation_language: str | None = None) -> str:
    """The instruction of a demo task; ast names its target language when that is not English."""
    if task == "ast" and translation_language and translation_language != "en":
        return f"Translate the audio into {LANGUAGE_NAMES.get(translation_language, translation_language)}."
    return DEMO_TASKS[task][0]


def text_conversations(pairs: list[tuple[str, str]], tasks: list[str], speakers: list[str], prefix: str,
                       translation_language: str = "en") -> list[dict]:
    """Training conversations from text alone (no recording): for each (text, translation) pair, asr (transcribe the
    text) and ast (translate it), its speech spoken by stage 2 in the speakers taken in turn."""
    rows = []
    for number, (text, translation) in enumerate(pairs):
        speech = {"type": "speech", "text": text, "speaker": speakers[number % len(speakers)] if speakers else None}
        for task, reply in (("asr", text), ("ast", translation)):
            if task in tasks and reply:
                rows.append({"id": f"{prefix}-{number:04d}/{task}", "task": task, "closed": False, "messages": [
                    {"role": "user", "content": [{"type": "text", "text": task_instruction(task, translation_language) + "\n"}, speech]},
                    {"role": "assistant", "content": reply}]})
    return rows


def check_conversation(row: object, where: str, require_answer: bool = True, audio_root: Path | None = None) -> dict:
    """Validate one conversation; a problem is a UsageError naming `where` (file:line) and the field. With
    `audio_root`, every speech part must carry a real recording (`audio`, relative paths resolved against
    `audio_root`) that exists: held-out speech to evaluate on."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object with 'messages'")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' is missing or empty; a conversation needs at least a user turn")
    for number, message in enumerate(messages):
        field = f"messages[{number}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise UsageError(f"{where}: {field}.role must be 'user' or 'assistant'")
        expected = "user" if number % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise UsageError(f"{where}: {field} is a {message['role']} turn where a {expected} turn belongs (turns alternate, user first)")
        content = message.get("content")
        if message["role"] == "assistant":
            if not isinstance(content, str) or not content.strip():
                raise UsageError(f"{where}: {field}.content: an assistant turn needs non-empty text")
            continue
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
            message["content"] = content
        if not isinstance(content, list) or not content:
            raise UsageError(f"{where}: {field}.content: a user turn needs text or a list of parts")
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "speech"):
                raise UsageError(f"{where}: {field}.content[{index}].type must be 'text' or 'speech'")
            if kind == "text" and not isinstance(part.get("text"), str):
                raise UsageError(f"{where}: {field}.content[{index}].text must be a string")
            if kind == "speech" and not (isinstance(part.get("text"), str) and part["text"].strip()) and not part.get("audio"):
                raise UsageError(f"{where}: {field}.content[{index}]: a speech part needs 'text' (spoken by stage 2) or 'audio'")
            if kind == "speech" and audio_root is not None:
                if not isinstance(part.get("audio"), str) or not part["audio"]:
                    raise UsageError(f"{where}: {field}.content[{index}]: a speech part has no real 'audio' (a recording); "
                                     "evaluation needs real speech in every speech part")
                part["audio"] = str((audio_root / part["audio"]).resolve())
                if not Path(part["audio"]).is_file():
                    raise UsageError(f"{where}: {field}.content[{index}].audio: {part['audio']} not found")
    if require_answer and messages[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the conversation ends without an assistant turn; add the answer to learn from")
    row.setdefault("id", where)
    row.setdefault("task", "instruction")
    row.setdefault("closed", False)
    return row


def read_conversations(path: str | Path, require_answer: bool = True, require_audio: bool = False) -> list[dict]:
    """The conversations of a JSONL file, each checked (`check_conversation`); with `require_audio` every speech part
    must name a real recording (`audio`, relative to the file)."""
    rows, seen = [], set()
    audio_root = Path(path).parent if require_audio else None
    for number, row in read_jsonl(path, "conversations file"):
        row = check_conversation(row, f"{path}:{number}", require_answer, audio_root)
        if row["id"] in seen:
            raise UsageError(f"{path}:{number}: id {row['id']!r} appears twice")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise UsageError(f"{path}: no conversations in the file")
    return rows


def speech_parts(row: dict) -> list[dict]:
    return [part for m in row["messages"] if m["role"] == "user" for part in m["content"] if part["type"] == "speech"]


def as_text(row: dict) -> dict:
    """The same request with every speech part written out as text (the text-only baseline of a speech request)."""
    messages = []
    for m in row["messages"]:
        if m["role"] == "user":
            m = {"role": "user", "content": [p if p["type"] == "text" else {"type": "text", "text": p.get("text", "")} for p in m["content"]]}
        messages.append(m)
    return {**row, "id": f"{row['id']}#text", "messages": messages}


def answer(row: dict) -> str:
    return row["messages"][-1]["content"] if row["messages"][-1]["role"] == "assistant" else ""


def demo_conversations(sentences_path: Path, manifest_rows: list[dict], split: str, tasks: list[str], voices_per_sentence: int,
                       seed: int) -> list[dict]:
    """The demo task set for one split (or several joined by '+', e.g. 'dev+test'): for each sentence,
    `voices_per_sentence` of its recordings (seeded choice), and for each recording one conversation per task whose
    answer the sentence has (`place`/`subject` may be empty)."""
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise UsageError(f"data.tasks: unknown demo task(s) {unknown}; choose from {', '.join(DEMO_TASKS)}")
    sentences = {row["sentence_id"]: row for _, row in read_jsonl(sentences_path, "sentences file")}
    wanted = set(split.split("+"))
    by_sentence: dict[str, list[dict]] = {}
    for utt in manifest_rows:
        if utt.get("split") in wanted and utt.get("sentence_id") in sentences:
            by_sentence.setdefault(utt["sentence_id"], []).append(utt)
    if not by_sentence:
        raise UsageError(f"{sentences_path}: no sentences of split '{split}' with recordings in the manifest")
    rng = random.Random(seed)
    rows = []
    for sid in sorted(by_sentence):
        sentence = sentences[sid]
        utts = sorted(by_sentence[sid], key=lambda u: u["id"])
        for utt in rng.sample(utts, min(voices_per_sentence, len(utts))):
            speech = {"type": "speech", "text": sentence["text"], "speaker": utt.get("speaker_id"), "utterance": utt["id"],
                      "audio": utt["audio_filepath"]}
            for task in tasks:
                _, field, closed = DEMO_TASKS[task]
                instruction = task_instruction(task, sentence.get("translation_language"))
                reply = sentence.get(field) or ""
                if not reply:
                    continue
                rows.append({"id": f"{utt['id']}/{task}", "task": task, "closed": closed, "messages": [
                    {"role": "user", "content": [{"type": "text", "text": instruction + "\n"}, speech]},
                    {"role": "assistant", "content": reply}]})
    return rows


def demo_labels(sentences_path: Path, manifest_rows: list[dict], rows: list[dict], field: str) -> dict[str, str]:
    """{conversation id: the `field` (e.g. 'verb') of the sentence its speech says} for demo task-set conversations:
    what a guesser that hears one word could condition on (see `adapt.no_listening_baselines`)."""
    sentences = {row["sentence_id"]: row for _, row in read_jsonl(sentences_path, "sentences file")}
    sentence_of = {utt["id"]: utt.get("sentence_id") for utt in manifest_rows}
    labels = {}
    for row in rows:
        parts = speech_parts(row)
        sentence = sentences.get(sentence_of.get(parts[0].get("utterance"))) if parts else None
        if sentence and sentence.get(field):
            labels[row["id"]] = str(sentence[field])
    return labels
