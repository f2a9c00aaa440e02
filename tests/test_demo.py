"""`bastion demo` (what `make demo` runs): start it, paste what it prints, stop it.

The demo runs on embedded defaults in its working directory (SQLite ./bastion.db).
Its default ports (8080 for the gateway, 8000 for the simulator) could clash with
other processes, so each test moves both with ``--port`` and ``--sim-port``. What is
printed is used as a user would: the curl pasted into bash, the SDK line, the CLI
command run from another directory. Stopping is by signal, as from a terminal or a
process manager, including from a shell that ignores SIGINT for its children.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from openai.types.responses import Response


@dataclass
class Demo:
    output: str  # everything printed up to "Press Ctrl-C to stop."
    key: str
    curl: str
    cli: str | None  # the command that reads the demo's ledger from any directory
    base_url: str  # as in the SDK line: http://127.0.0.1:PORT/v1
    port: int
    sim_port: int
    proc: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The environment without Bastion's own variables, so only what the test says counts."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}


@contextlib.contextmanager
def running_demo(
    cwd: Path,
    *args: str,
    preexec_fn: Callable[[], object] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Demo]:
    """`bastion demo --port P --sim-port Q ARGS` in ``cwd``, once it has printed everything."""
    port, sim_port = free_port(), free_port()
    stderr = (cwd / "stderr.txt").open("a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion", "demo", "--port", str(port), "--sim-port",
         str(sim_port), *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**clean_env(), **(env or {})}, preexec_fn=preexec_fn,
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:  # the test's timeout bounds this wait
            lines.append(line)
            if line.startswith("Press Ctrl-C to stop."):
                break
        output = "".join(lines)
        assert "Press Ctrl-C" in output, f"demo stopped early:\n{output}{_read(cwd)}"
        key = re.search(r"^  (qbt_\S+)$", output, re.M)
        curl = re.search(r"^curl .*?'$", output, re.M | re.S)  # up to the closing quote of -d
        cli = re.search(r"from any directory:\n\n  (.+)\n", output)
        base_url = re.search(r"OpenAI\(base_url='(\S+)'", output)
        assert key and curl and base_url, output
        command = cli[1] if cli else None
        yield Demo(output, key[1], curl[0], command, base_url[1], port, sim_port, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def _read(cwd: Path) -> str:
    return (cwd / "stderr.txt").read_text()


def stop(demo: Demo, sig: signal.Signals, cwd: Path) -> None:
    """Send ``sig``: the demo must exit 0 within a few seconds and free both ports."""
    demo.proc.send_signal(sig)
    try:
        code = demo.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"demo still running 5 s after {sig.name}:\n{_read(cwd)}", pytrace=False)
    assert code == 0, f"exit {code} after {sig.name}:\n{_read(cwd)}"
    for port in (demo.port, demo.sim_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


def run_cli(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A printed command, pasted into bash in ``cwd``."""
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=clean_env(), capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip


def ignore_sigint() -> None:
    """What a non-interactive shell does to a job it starts with ``&``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.timeout(60)
def test_demo_prints_a_working_key_and_curl(tmp_path: Path):
    with running_demo(tmp_path) as demo:
        assert (tmp_path / "bastion.db").exists()  # a fresh ledger in the working directory
        assert "Account 'demo' has $10.00 of credit." in demo.output
        assert demo.base_url == f"http://127.0.0.1:{demo.port}/v1"  # --port
        assert httpx.get(f"http://127.0.0.1:{demo.sim_port}/health").status_code == 200

        # Paste the printed curl into a shell. ($CURL_HOME/.curlrc adds the status line.)
        (tmp_path / ".curlrc").write_text('write-out = "\\n%{http_code}"\n')
        pasted = subprocess.run(
            ["bash", "-c", demo.curl], env={**os.environ, "CURL_HOME": str(tmp_path)},
            capture_output=True, text=True, timeout=30,
        )
        assert pasted.returncode == 0, pasted.stderr
        body, status = pasted.stdout.rsplit("\n", 1)
        assert status == "200", body
        assert Response.model_validate_json(body).output_text == "ok"

        # The official Python SDK, as the demo suggests; the gateway relays to the
        # simulator on --sim-port (nothing listens on the default 8000 for it).
        client = OpenAI(base_url=demo.base_url, api_key=demo.key, max_retries=0, timeout=20)
        res = client.responses.create(
            model="gpt-oss-120b", input="Reply with: ok", max_output_tokens=32, store=False
        )
        assert res.output_text == "ok"
        assert {m.id for m in client.models.list()} >= {"gpt-oss-120b", "Qwen3-32B"}

        # The variables the examples read.
        assert f"export OPENAI_BASE_URL={demo.base_url} OPENAI_API_KEY={demo.key}" in demo.output

        # Ctrl-C stops both servers and the process exits cleanly.
        stop(demo, signal.SIGINT, tmp_path)


@pytest.mark.timeout(90)
def test_second_run_reuses_the_key(tmp_path: Path):
    with running_demo(tmp_path) as first:
        assert "new; saved in" in first.output
        stop(first, signal.SIGINT, tmp_path)
    saved = tmp_path / "bastion.db.demo-key"
    assert saved.read_text().strip() == first.key
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600  # a secret: its owner's only

    with running_demo(tmp_path) as second:
        assert second.key == first.key
        assert f"reused from {saved}" in second.output
        assert "Account 'demo' has $10.00 of credit." in second.output  # not granted twice
        client = OpenAI(base_url=second.base_url, api_key=second.key, max_retries=0)
        assert {m.id for m in client.models.list()} >= {"gpt-oss-120b"}
        stop(second, signal.SIGINT, tmp_path)

    assert second.cli, second.output
    keys = run_cli(second.cli.replace("accounts show demo", "keys list --json"), tmp_path)
    assert keys.returncode == 0, keys.stderr
    assert [(k["account"], k["revoked"]) for k in json.loads(keys.stdout)] == [("demo", False)]

    # A key the store no longer accepts is not reused: a new one replaces it in the file.
    [key_id] = [k["id"] for k in json.loads(keys.stdout)]
    revoked = run_cli(second.cli.replace("accounts show demo", f"keys revoke {key_id}"), tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    with running_demo(tmp_path) as third:
        assert third.key != first.key
        assert "new; saved in" in third.output
        stop(third, signal.SIGTERM, tmp_path)
    assert saved.read_text().strip() == third.key


@pytest.mark.timeout(60)
def test_ctrl_c_stops_the_demo_even_when_the_shell_ignores_sigint(tmp_path: Path):
    with running_demo(tmp_path, preexec_fn=ignore_sigint) as demo:
        stop(demo, signal.SIGINT, tmp_path)


@pytest.mark.timeout(60)
def test_sigterm_stops_the_demo_cleanly(tmp_path: Path):
    with running_demo(tmp_path) as demo:
        stop(demo, signal.SIGTERM, tmp_path)


@pytest.mark.timeout(60)
def test_printed_cli_command_reads_the_demo_ledger_from_any_directory(tmp_path: Path):
    """Even when the demo's config names its ledger relative to the demo's directory."""
    demo_dir, elsewhere = tmp_path / "demo", tmp_path / "elsewhere"
    demo_dir.mkdir()
    elsewhere.mkdir()
    (demo_dir / "data").mkdir()
    config = demo_dir / "demo.toml"
    config.write_text('[database]\nurl = "sqlite:///data/ledger.db"\n')
    with running_demo(demo_dir, "--config", str(config)) as demo:
        assert (demo_dir / "data" / "ledger.db").exists()
        client = OpenAI(base_url=demo.base_url, api_key=demo.key, max_retries=0, timeout=20)
        client.responses.create(
            model="gpt-oss-120b", input="Reply with: ok", max_output_tokens=32, store=False
        )

        # Pasted verbatim in another directory: the demo account and its balance.
        assert demo.cli, demo.output
        shown = run_cli(demo.cli, elsewhere)
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"\bdemo\b.*\bacct_\w+.*\$\d+\.\d\d", shown.stdout), shown.stdout

        # The same command with --json: the request just made is billed in that ledger.
        deadline = time.monotonic() + 10
        while True:
            read = run_cli(demo.cli + " --json", elsewhere)
            assert read.returncode == 0, read.stderr
            account = json.loads(read.stdout)
            if account["spent"] != "0.00" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert account["name"] == "demo"
        assert account["spent"] != "0.00", account
        assert not (elsewhere / "bastion.db").exists()  # no stray ledger made where it ran
        assert not (elsewhere / "data").exists()
        stop(demo, signal.SIGINT, demo_dir)


@pytest.mark.timeout(90)
def test_demo_on_postgresql_keeps_its_key_in_the_state_directory(tmp_path: Path, pg_url: str):
    """No SQLite file to sit next to: the key goes to $XDG_STATE_HOME/bastion/."""
    env = {"BASTION_DATABASE_URL": pg_url, "XDG_STATE_HOME": str(tmp_path / "state")}
    with running_demo(tmp_path, env=env) as first:
        assert "new; saved in" in first.output
        stop(first, signal.SIGTERM, tmp_path)
    [saved] = (tmp_path / "state" / "bastion").iterdir()
    assert saved.read_text().strip() == first.key
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    with running_demo(tmp_path, env=env) as second:
        assert second.key == first.key
        assert f"reused from {saved}" in second.output
        # The printed command reaches the same database from anywhere.
        assert second.cli, second.output
        shown = run_cli(second.cli + " --json", tmp_path / "state")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["name"] == "demo"
        stop(second, signal.SIGINT, tmp_path)
    assert not (tmp_path / "bastion.db").exists()
