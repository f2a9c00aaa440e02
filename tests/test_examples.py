"""The three examples of the public API reference, run verbatim against Bastion.

The examples are copied character for character from the reference our clients
read: the curl below, and ``tests/js/openai_sdk.mjs`` and ``tests/js/fetch.mjs``.
They point at the production URL; each test swaps only that string for the test
gateway's URL and sets ``QUBITTRON_API_KEY`` to a fresh key, then runs the real
``curl`` and ``node``. docs/api.md carries the same three, pointed at the demo's URL,
and a test keeps them identical. Missing tools are a failure, not a skip: CI has them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from openai.types.responses import Response

PRODUCTION_URL = "https://api.qubittron.ai/v1"
JS_DIR = Path(__file__).parent / "js"
API_DOC = Path(__file__).parent.parent / "docs" / "api.md"
DEMO_URL = "http://127.0.0.1:8080/v1"

CURL_EXAMPLE = """\
curl https://api.qubittron.ai/v1/responses \\
  -H "Authorization: Bearer $QUBITTRON_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "gpt-oss-120b",
    "input": "Reply with: ok",
    "max_output_tokens": 32,
    "store": false
  }'"""


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` is not installed; the reference examples need it", pytrace=False)
    return path


def pointed_at(gateway, example: str) -> str:
    """The example with only its base URL replaced by the test gateway's."""
    assert example.count(PRODUCTION_URL) == 1, "the example no longer names the production URL"
    return example.replace(PRODUCTION_URL, gateway.url)


def run(args: list[str], key: str, cwd: Path | None = None, **env: str) -> str:
    """Run a command with QUBITTRON_API_KEY set, as a client would; return its stdout."""
    done = subprocess.run(
        args, cwd=cwd, env={**os.environ, "QUBITTRON_API_KEY": key, **env},
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}: {done.stderr}"
    return done.stdout


JS_FILES = ("openai_sdk.mjs", "fetch.mjs")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/js/node_modules, installed from the committed lock file when missing."""
    require("node")
    npm = require("npm")
    if not (JS_DIR / "node_modules" / "openai").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300)
    return JS_DIR / "node_modules"


def run_js(gateway, node_modules: Path, tmp_path: Path, name: str, key: str) -> str:
    """Run tests/js/<name> with the gateway's URL, next to the installed `openai` package."""
    script = tmp_path / name
    script.write_text(pointed_at(gateway, (JS_DIR / name).read_text()))
    (tmp_path / "node_modules").symlink_to(node_modules, target_is_directory=True)
    return run([require("node"), str(script)], key, cwd=tmp_path)


def test_curl_example(gateway, tmp_path):
    require("curl")
    key, account = gateway.new_key()
    # curl reads $CURL_HOME/.curlrc: it adds the status line without touching the example.
    (tmp_path / ".curlrc").write_text('write-out = "\\n%{http_code}"\n')
    out = run(["bash", "-c", pointed_at(gateway, CURL_EXAMPLE)], key, CURL_HOME=str(tmp_path))
    body, status = out.rsplit("\n", 1)
    assert status == "200", body
    response = Response.model_validate_json(body)  # the Python SDK's type for the body
    assert response.output_text == "ok"
    assert response.model == "gpt-oss-120b"
    [row] = gateway.settled(account, 1)
    assert row.status == "200" and row.endpoint == "responses"
    assert row.output_tokens == response.usage.output_tokens


def test_openai_npm_sdk_example(gateway, node_modules, tmp_path):
    key, account = gateway.new_key()
    out = run_js(gateway, node_modules, tmp_path, "openai_sdk.mjs", key)
    assert out == "ok\n"
    [row] = gateway.settled(account, 1)
    assert row.status == "200" and row.model == "gpt-oss-120b" and row.cost > 0


def test_fetch_example(gateway, node_modules, tmp_path):
    key, account = gateway.new_key()
    out = run_js(gateway, node_modules, tmp_path, "fetch.mjs", key)
    # console.log of an object prints node's inspect format, not JSON.
    assert "model: 'gpt-oss-120b'" in out
    assert "object: 'response'" in out
    assert re.search(r"\boutput: \[", out), out
    usage = re.search(r"usage: \{.*?input_tokens: (\d+),.*?output_tokens: (\d+),", out, re.S)
    assert usage, out
    [row] = gateway.settled(account, 1)
    assert row.status == "200" and row.endpoint == "responses"
    assert (row.input_tokens, row.output_tokens) == (int(usage[1]), int(usage[2]))


def test_the_api_doc_carries_the_three_examples_verbatim():
    """docs/api.md is what clients read: its examples are these, pointed at the demo."""
    doc = API_DOC.read_text()
    for example in (CURL_EXAMPLE, *(JS_DIR.joinpath(n).read_text() for n in JS_FILES)):
        assert example.count(PRODUCTION_URL) == 1
        assert example.replace(PRODUCTION_URL, DEMO_URL).strip() in doc
