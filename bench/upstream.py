"""The benchmark's upstream: nginx serving fixed, valid OpenAI bodies from memory.

The bodies are rendered once by the simulator itself (`bastion.sim`, in process), so
they are exactly what `bastion sim` (and vLLM) send and the gateway can meter them:

- POST /v1/responses: a Response object (16 output tokens, with `usage`);
- POST /v1/chat/completions: a `chat.completion` (with `usage`);
- POST /stream/v1/responses: the full Responses event stream, 50
  `response.output_text.delta` events, ending with `response.completed` + usage;
- POST /stream/v1/chat/completions: 50 `chat.completion.chunk`s, the finish chunk,
  the usage chunk, `data: [DONE]`.

nginx's static handler answers POST with 405, and its config refuses strings over 4 KB
(so `return 200 '<body>'` cannot hold a stream). So the bodies are files under
`<dir>/www/`, and `error_page 405 =200 $uri` turns the 405 into an internal GET of the
same file, answered 200 from nginx's open-file cache with sendfile. The configs are the
templates in bench/nginx/ with their placeholders (upper-case names between double
at-signs) filled in.

    python -m bench.upstream --port 9100            # run the static upstream in the foreground
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "nginx"

PROMPT = "Write a short note about API gateways."
STREAM_TOKENS = 50
JSON_TOKENS = 16

# What the load generator sends (through a gateway, or straight to nginx, which ignores it).
REQUESTS: dict[tuple[str, str], dict] = {
    ("responses", "json"): {"model": "bench-json", "input": PROMPT, "store": False},
    ("chat", "json"): {"model": "bench-json", "messages": [{"role": "user", "content": PROMPT}]},
    ("responses", "stream"): {
        "model": "bench-stream",
        "input": PROMPT,
        "store": False,
        "stream": True,
    },
    ("chat", "stream"): {
        "model": "bench-stream",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    },
}
MODELS = json.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "bench"}
            for m in ("bench-json", "bench-stream")
        ],
    }
)
PATHS = {"responses": "/v1/responses", "chat": "/v1/chat/completions"}


def upstream_path(endpoint: str, mode: str) -> str:
    """The path on nginx that answers this scenario (what a gateway forwards to)."""
    return ("/stream" if mode == "stream" else "") + PATHS[endpoint]


async def _render() -> dict[tuple[str, str], bytes]:
    from aiohttp.test_utils import TestClient, TestServer

    from bastion.sim import create_app

    out: dict[tuple[str, str], bytes] = {}
    async with TestClient(TestServer(create_app())) as client:
        for (endpoint, mode), body in REQUESTS.items():
            tokens = STREAM_TOKENS if mode == "stream" else JSON_TOKENS
            resp = await client.post(
                PATHS[endpoint], json=body, headers={"x-sim-tokens": str(tokens)}
            )
            assert resp.status == 200, (endpoint, mode, resp.status, await resp.text())
            out[(endpoint, mode)] = await resp.read()
    return out


def render_bodies() -> dict[tuple[str, str], bytes]:
    """The four upstream answers, rendered by the simulator and checked for what we rely on."""
    bodies = asyncio.run(_render())
    for (endpoint, mode), data in bodies.items():
        text = data.decode()
        if mode == "json":
            assert "usage" in json.loads(text), (endpoint, mode)
        elif endpoint == "responses":
            assert text.count("event: response.output_text.delta\n") == STREAM_TOKENS
            assert "event: response.completed\n" in text and '"usage":{' in text
        else:
            assert text.count('"delta":{"content"') == STREAM_TOKENS
            assert text.endswith("data: [DONE]\n\n") and '"usage":{' in text
    return bodies


def fill(template: str, **values: object) -> str:
    text = (TEMPLATES / template).read_text()
    for name, value in values.items():
        text = text.replace(f"@@{name.upper()}@@", str(value))
    assert "@@" not in text, f"unfilled hole in {template}"
    return text


def write_configs(tmp: Path, upstream_port: int, proxy_port: int) -> tuple[Path, Path]:
    """Write the static upstream's and the proxy baseline's nginx configs into `tmp`."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    www = tmp / "www"
    for (endpoint, mode), data in render_bodies().items():
        path = www / upstream_path(endpoint, mode).lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for prefix in ("v1", "stream/v1"):
        (www / prefix / "models").write_text(MODELS)
    up = tmp / "upstream.conf"
    up.write_text(fill("upstream.conf", tmp=tmp, port=upstream_port))
    proxy = tmp / "proxy.conf"
    proxy.write_text(fill("proxy.conf", tmp=tmp, port=proxy_port, upstream_port=upstream_port))
    return up, proxy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--proxy-port", type=int, default=9101)
    ap.add_argument("--dir", help="where to write the configs (default: a temporary directory)")
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="bastion-bench-"))
    up, proxy = write_configs(tmp, args.port, args.proxy_port)
    print(f"configs: {up} {proxy}; serving http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    subprocess.run(["nginx", "-p", str(tmp), "-c", str(up)], check=False)


if __name__ == "__main__":
    main()
