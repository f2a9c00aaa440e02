"""The client examples of examples/, each run as a user would against a real gateway.

Each script gets OPENAI_BASE_URL (the test gateway) and OPENAI_API_KEY (a fresh key of
a fresh account), makes its client's basic calls, prints one line per answer, and
exits non-zero on any failure. The test then reads the account's ledger: one settled
row per call shows every call went through Bastion and was billed.

Always run (CI): the official SDKs for Python and Node, and the Vercel AI SDK.
LangChain, litellm and the Agents SDK are heavy installs, so they run only under
``BASTION_ALL_EXAMPLES=1`` (``make examples``, which installs them); there a missing
package fails the test. Missing ``node`` or ``npm`` is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NODE_DIR = EXAMPLES / "node"
PYTHON_DIR = EXAMPLES / "python"

BOTH_APIS = ("responses", "responses (stream)", "chat", "chat (stream)")
ANSWER = "ok"  # the simulator answers "Reply with: ok" with exactly that

make_examples_only = pytest.mark.skipif(
    os.environ.get("BASTION_ALL_EXAMPLES") != "1", reason="make examples runs these"
)


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` is not installed; the Node examples need it", pytrace=False)
    return path


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """examples/node/node_modules, installed from the committed lock file when stale."""
    require("node")
    npm = require("npm")
    installed = NODE_DIR / "node_modules" / ".package-lock.json"  # written by npm ci
    lock = NODE_DIR / "package-lock.json"
    if not installed.is_file() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300
        )
    return NODE_DIR / "node_modules"


def run_example(gateway, args: list[str], cwd: Path, labels: tuple[str, ...]) -> None:
    """Run one example with a fresh key; check what it printed and what the ledger holds."""
    key, account = gateway.new_key()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LITELLM_"))
    }  # nothing of the developer's own OpenAI setup leaks in
    env.update(OPENAI_BASE_URL=gateway.url, OPENAI_API_KEY=key)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{args[-1]} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    assert done.stdout.splitlines() == [f"{label}: {ANSWER}" for label in labels], done.stdout

    rows = gateway.settled(account, len(labels))
    assert len(rows) == len(labels), [(r.endpoint, r.status) for r in rows]
    assert {r.status for r in rows} == {"200"}, [(r.endpoint, r.status) for r in rows]
    assert Counter(r.endpoint for r in rows) == Counter(label.split()[0] for label in labels)
    assert all(r.model == "gpt-oss-120b" and r.cost > 0 for r in rows)


def run_python(gateway, name: str, labels: tuple[str, ...]) -> None:
    run_example(gateway, [sys.executable, str(PYTHON_DIR / name)], PYTHON_DIR, labels)


def run_node(gateway, name: str, labels: tuple[str, ...]) -> None:
    run_example(gateway, [require("node"), str(NODE_DIR / name)], NODE_DIR, labels)


# ---- always ---------------------------------------------------------------------------


def test_openai_python_sdk(gateway):
    run_python(gateway, "openai_sdk.py", BOTH_APIS)


def test_openai_node_sdk(gateway, node_modules):
    run_node(gateway, "openai_sdk.mjs", BOTH_APIS)


def test_vercel_ai_sdk(gateway, node_modules):
    run_node(gateway, "vercel_ai.mjs", BOTH_APIS)


# ---- make examples --------------------------------------------------------------------


@make_examples_only
def test_langchain(gateway):
    run_python(gateway, "langchain_client.py", BOTH_APIS)


@make_examples_only
def test_litellm(gateway):
    run_python(gateway, "litellm_client.py", ("chat", "chat (stream)"))


@make_examples_only
def test_openai_agents_sdk(gateway):
    run_python(gateway, "agents_sdk.py", ("responses", "responses (stream)"))
