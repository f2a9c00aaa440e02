"""litellm as a client library against Bastion.

`litellm.completion` (whole) and `litellm.acompletion` (streamed) on Chat Completions;
the `openai/` prefix tells litellm to speak the OpenAI protocol to `api_base`. Run it
against `make demo`, with the two variables the demo prints:

    export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=qbt_...
    python examples/python/litellm_client.py
"""

from __future__ import annotations

import asyncio
import os
import sys

# litellm fetches its model price list from GitHub at import unless told otherwise;
# the copy it ships is enough here (and works offline).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm

MODEL = "openai/gpt-oss-120b"  # Bastion sees "gpt-oss-120b"
MESSAGES = [{"role": "user", "content": "Reply with: ok"}]


def settings() -> tuple[str, str]:
    """Both variables are required, so a forgotten base URL never sends the key elsewhere."""
    missing = [v for v in ("OPENAI_BASE_URL", "OPENAI_API_KEY") if not os.environ.get(v)]
    if missing:
        sys.exit(f"set {' and '.join(missing)} (`make demo` prints them)")
    return os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"]


def show(label: str, text: str) -> None:
    """Print one answer; an empty one is a failure (exit 1)."""
    print(f"{label}: {text}", flush=True)
    if not text.strip():
        sys.exit(f"{label}: empty answer")


async def streamed(base_url: str, api_key: str) -> str:
    chunks = await litellm.acompletion(
        model=MODEL, messages=MESSAGES, api_base=base_url, api_key=api_key,
        max_tokens=32, stream=True, num_retries=0, timeout=30,
    )
    text = ""
    async for chunk in chunks:
        text += chunk.choices[0].delta.content or ""
    return text


def main() -> None:
    base_url, api_key = settings()
    response = litellm.completion(
        model=MODEL, messages=MESSAGES, api_base=base_url, api_key=api_key,
        max_tokens=32, num_retries=0, timeout=30,
    )
    show("chat", response.choices[0].message.content or "")
    show("chat (stream)", asyncio.run(streamed(base_url, api_key)))


if __name__ == "__main__":
    main()
