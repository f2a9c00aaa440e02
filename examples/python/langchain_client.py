"""LangChain (`langchain-openai`) against Bastion.

`ChatOpenAI` on the Responses API and on Chat Completions (its default), each once
with `invoke` and once with `stream`. Run it against `make demo`, with the two
variables the demo prints:

    export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=qbt_...
    python examples/python/langchain_client.py
"""

from __future__ import annotations

import os
import sys

from langchain_openai import ChatOpenAI

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
    common = {"model": MODEL, "base_url": base_url, "api_key": api_key, "max_retries": 0,
              "timeout": 30, "max_tokens": 32}

    # Responses API. Bastion keeps no conversation state: store=False (LangChain's
    # default there is True), and no use_previous_response_id.
    responses = ChatOpenAI(**common, use_responses_api=True, store=False)
    show("responses", responses.invoke(PROMPT).text)
    show("responses (stream)", "".join(chunk.text for chunk in responses.stream(PROMPT)))

    # Chat Completions.
    chat = ChatOpenAI(**common)
    show("chat", chat.invoke(PROMPT).text)
    show("chat (stream)", "".join(chunk.text for chunk in chat.stream(PROMPT)))


if __name__ == "__main__":
    main()
