"""The official `openai` SDK for Python against Bastion.

Responses and Chat Completions, each once whole and once streamed. Run it against
`make demo`, with the two variables the demo prints:

    export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=qbt_...
    python examples/python/openai_sdk.py
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI

MODEL = "gpt-oss-120b"
PROMPT = "Reply with: ok"


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


def main() -> None:
    base_url, api_key = settings()
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)

    # Responses API. Bastion keeps no conversation state: send store=False.
    response = client.responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=32, store=False
    )
    show("responses", response.output_text)

    text = ""
    stream = client.responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=32, store=False, stream=True
    )
    for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type in ("error", "response.failed"):
            sys.exit(f"responses (stream): {event}")
    show("responses (stream)", text)

    # Chat Completions.
    messages = [{"role": "user", "content": PROMPT}]
    completion = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=32
    )
    show("chat", completion.choices[0].message.content or "")

    text = ""
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    show("chat (stream)", text)


if __name__ == "__main__":
    main()
