"""`bastion demo` (what `make demo` runs): start it, paste what it prints, stop it.

The demo runs on embedded defaults in the current directory (SQLite ./bastion.db).
Its fixed ports (8080 for the gateway, 8000 for the simulator) could clash with
other processes, so the test gives it a config that moves just those two; the
catalogue stays the default one, since every default model names the upstream "sim".
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI
from openai.types.responses import Response

PORTS_ONLY = """
[server]
port = {port}

[[upstreams]]  # replaces the default list: same name, another port
name = "sim"
url = "http://127.0.0.1:{sim}/v1"
"""


@dataclass
class Demo:
    output: str  # everything printed up to "Press Ctrl-C to stop."
    key: str
    curl: str
    proc: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_demo(tmp_path: Path) -> Iterator[Demo]:
    """`bastion demo` in ``tmp_path``, once it has printed its key and curl."""
    config = tmp_path / "ports.toml"
    config.write_text(PORTS_ONLY.format(port=free_port(), sim=free_port()))
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion", "demo", "--config", str(config)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # the test's timeout bounds this wait
            lines.append(line)
            if line.startswith("Press Ctrl-C to stop."):
                break
        output = "".join(lines)
        assert "Press Ctrl-C" in output, f"demo stopped early:\n{output}{_read(tmp_path)}"
        key = re.search(r"^  (qbt_\S+)$", output, re.M)
        curl = re.search(r"^curl .*?'$", output, re.M | re.S)  # up to the closing quote of -d
        assert key and curl, output
        yield Demo(output, key[1], curl[0], proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def _read(tmp_path: Path) -> str:
    return (tmp_path / "stderr.txt").read_text()


@pytest.mark.timeout(60)
def test_demo_prints_a_working_key_and_curl(tmp_path: Path):
    with running_demo(tmp_path) as demo:
        assert (tmp_path / "bastion.db").exists()  # a fresh ledger in the working directory
        assert "Account 'demo' has $10.00 of credit." in demo.output

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

        # The official Python SDK, as the demo suggests.
        base_url = re.search(r"OpenAI\(base_url='(\S+)'", demo.output)[1]
        client = OpenAI(base_url=base_url, api_key=demo.key, max_retries=0, timeout=20)
        res = client.responses.create(
            model="gpt-oss-120b", input="Reply with: ok", max_output_tokens=32, store=False
        )
        assert res.output_text == "ok"
        assert {m.id for m in client.models.list()} >= {"gpt-oss-120b", "Qwen3-32B"}

        # Ctrl-C stops both servers and the process exits cleanly.
        demo.proc.send_signal(signal.SIGINT)
        assert demo.proc.wait(timeout=15) == 0, _read(tmp_path)
