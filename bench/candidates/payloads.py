"""Fixed payloads shared by the candidate benchmarks (bench/candidates/)."""

import json

REQUEST = {
    "model": "llama-3.1-8b-instruct",
    "messages": [
        {"role": "system", "content": "You are a terse assistant. Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France, and why is it famous?"},
    ],
    "max_tokens": 64,
    "temperature": 0.2,
    "stream": False,
    "user": "bench-user-0001",
}

RESPONSE = {
    "id": "chatcmpl-8f3a9c2e7b1d4e6fa0c5b9d8e7f6a5b4",
    "object": "chat.completion",
    "created": 1732550400,
    "model": "llama-3.1-8b-instruct",
    "system_fingerprint": "fp_bastion_bench_0001",
    "service_tier": "default",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": (
                    "Paris is the capital of France, famous for the Eiffel Tower, the Louvre, "
                    "its cafes, fashion houses and centuries of art, science and politics; "
                    "it is also one of the most visited cities in the world, year after year."
                ),
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 41, "completion_tokens": 48, "total_tokens": 89},
}

CHUNK = {
    "id": "chatcmpl-8f3a9c2e7b1d4e6f",
    "object": "chat.completion.chunk",
    "created": 1732550400,
    "model": "llama-3.1-8b-instruct",
    "choices": [{"index": 0, "delta": {"content": "token"}, "finish_reason": None}],
}

REQUEST_BYTES = json.dumps(REQUEST, separators=(",", ":")).encode()
RESPONSE_BYTES = json.dumps(RESPONSE, separators=(",", ":")).encode()
SSE_EVENT = b"data: " + json.dumps(CHUNK, separators=(",", ":")).encode() + b"\n\n"
SSE_EVENTS = 50

if __name__ == "__main__":
    print(len(REQUEST_BYTES), len(RESPONSE_BYTES), len(SSE_EVENT))
