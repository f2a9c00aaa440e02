"""LiteLLM proxy as a comparison target: its own venv (bench/.venv-litellm) and config.

The venv is made on first use with `pip install 'litellm[proxy]'`. The proxy runs with
no database (so no spend tracking: it does less per request than Bastion), a master key
checked on every request, one uvicorn worker, and the same nginx upstream as Bastion:
`openai/<model>` with `api_base` pointing at nginx.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-litellm"
MASTER_KEY = "sk-bench-litellm-master-key"

CONFIG = """\
model_list:
  - model_name: bench-json
    litellm_params:
      model: openai/bench-json
      api_base: http://127.0.0.1:{port}/v1
      api_key: sk-upstream-unused
  - model_name: bench-stream
    litellm_params:
      model: openai/bench-stream
      api_base: http://127.0.0.1:{port}/stream/v1
      api_key: sk-upstream-unused
litellm_settings:
  telemetry: false
  num_retries: 0
general_settings:
  master_key: {key}
"""

# No network at start (cost map), quiet logs.
ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
    "DISABLE_ADMIN_UI": "True",
}


def ensure(log) -> Path | None:
    """The `litellm` executable, installing it into bench/.venv-litellm if needed."""
    exe = VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    log(f"installing litellm[proxy] into {VENV} (once) …")
    try:
        subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
            check=True,
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        log(f"  LiteLLM install failed ({exc}); its column will be n/a")
        return None
    return exe if exe.exists() else None


def version() -> str:
    out = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m;print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "?"


def write_config(path: Path, upstream_port: int) -> Path:
    path.write_text(CONFIG.format(port=upstream_port, key=MASTER_KEY))
    return path


def command(exe: Path, config: Path, port: int) -> list[str]:
    return [
        str(exe),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
