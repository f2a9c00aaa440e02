"""The OpenAI Agents SDK (`openai-agents`) against Bastion.

One agent on the Responses API, run once whole (`Runner.run`) and once streamed
(`Runner.run_streamed`). Bastion keeps no conversation state, so the model settings
say store=False and nothing chains turns by `previous_response_id` (Bastion refuses
it); tracing is off, since it would upload traces to OpenAI with this key. Run it
against `make demo`, with the two variables the demo prints:

    export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=qbt_...
    python examples/python/agents_sdk.py
"""

from __future__ import annotations

import asyncio
import os
import sys

from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled
from openai import AsyncOpenAI
from openai.types.responses import ResponseTextDeltaEvent

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


async def main() -> None:
    base_url, api_key = settings()
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
    agent = Agent(
        name="assistant",
        model=OpenAIResponsesModel(MODEL, client),
        model_settings=ModelSettings(max_tokens=32, store=False),
    )

    result = await Runner.run(agent, PROMPT)
    show("responses", str(result.final_output))

    run = Runner.run_streamed(agent, PROMPT)
    text = ""
    async for event in run.stream_events():
        if event.type == "raw_response_event" and isinstance(event.data, ResponseTextDeltaEvent):
            text += event.data.delta
    show("responses (stream)", text)


if __name__ == "__main__":
    asyncio.run(main())
