"""Run the speechless CLI in a subprocess against the FakeHub of test_hub_backend, its state kept in a JSON file.

    python tests/fakehub_cli.py STATE.json hub push FOLDER --stage stage1 --backend hub --hub-namespace my-org

Each request is answered like a server would: the state is loaded, the request handled, the new state saved
atomically BEFORE the response returns (a killed client never loses a change the server acknowledged), and the
request's kind appended to STATE.json.requests (a progress marker for kill tests). FAKEHUB_DELAY_S slows every
request so a kill can land in the middle of a push.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx2  # noqa: E402
import huggingface_hub  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402
from huggingface_hub.utils import _http as hf_http  # noqa: E402
from test_hub_backend import FakeHub  # noqa: E402

from speechless.cli import run  # noqa: E402
from speechless.core.io import write_json  # noqa: E402


def _encode(repos: dict) -> dict:
    return {repo_id: {**repo, "commits": {sha: {**c, "files": {p: base64.b64encode(b).decode() for p, b in c["files"].items()}}
                                          for sha, c in repo["commits"].items()}}
            for repo_id, repo in repos.items()}


def _decode(repos: dict) -> dict:
    return {repo_id: {**repo, "commits": {sha: {**c, "files": {p: base64.b64decode(b) for p, b in c["files"].items()}}
                                          for sha, c in repo["commits"].items()}}
            for repo_id, repo in repos.items()}


def load_state(path: Path) -> FakeHub:
    hub = FakeHub()
    if path.is_file():
        saved = json.loads(path.read_text())
        hub.repos, hub.counter, hub.failures = _decode(saved["repos"]), saved["counter"], saved.get("failures", {})
    return hub


def save_state(path: Path, hub: FakeHub) -> None:
    write_json(path, {"repos": _encode(hub.repos), "counter": hub.counter, "failures": hub.failures})


def main() -> int:
    state = Path(sys.argv[1])
    delay = float(os.environ.get("FAKEHUB_DELAY_S", "0"))

    def handler(request: httpx2.Request) -> httpx2.Response:
        time.sleep(delay)
        hub = load_state(state)
        response = hub.handler(request)
        save_state(state, hub)
        with open(f"{state}.requests", "a") as log:
            log.write(f"{request.method} {request.url.path}\n")
        return response

    hf_constants.HF_HUB_OFFLINE = False
    hf_constants.HF_HUB_DISABLE_TELEMETRY = True
    hf_constants.HF_HUB_CACHE = str(state.parent / "hf-cache")
    hf_constants.AGENT_HARNESSES_PATH = str(state.parent / "hf-home" / ".agent_harnesses.json")
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(handler), event_hooks={"request": [hf_http.hf_request_event_hook]}, follow_redirects=True))
    return run(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
