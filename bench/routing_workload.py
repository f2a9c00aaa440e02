"""The routing benchmark's workloads: every request planned in advance from one seed.

The same seed gives the same sessions, send times, texts and output lengths for every
policy, so policies are compared on identical offered load. Each request's prompt
tokens and answer are computed here with the simulator's own pure functions
(`bastion.sim.reply`), so the conversation history of a later turn does not depend on
what an earlier turn returned (the client checks that the streamed answer matches).

- ``shared-prefix``: 20 applications, each with its own system prompt of about 2,000
  tokens; sessions pick an application by Zipf popularity and send 2 to 4 turns, each
  turn appending the previous answer and a new user message. No key is sent, so a
  gateway can only group them by the prompt's leading part.
- ``shared-prefix+key``: the same requests with ``prompt_cache_key`` = the session.
- ``uniform``: the same schedule and sizes, but every request's system prompt is
  distinct random text of the same length: no two requests share a prefix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from bastion.sim.reply import input_tokens_for, reply_text

MODEL = "bench-routing"
WORKLOADS = ("shared-prefix", "shared-prefix+key", "uniform")
APPS = 20
ZIPF_S = 1.1
SYSTEM_CHARS = (7_200, 8_800)  # 1,800 to 2,200 tokens at the simulator's 4 bytes a token
USER_WORDS = (20, 60)
OUTPUT_TOKENS = (30, 60)
TURNS = (2, 4)
THINK_S = 2.0  # mean pause between an answer and the session's next turn (exponential)
VOCAB_WORDS = 4_000


@dataclass(frozen=True, slots=True)
class SimShape:
    """One replica's `bastion sim` load-model figures."""

    max_num_seqs: int = 8
    prefill_tokens_per_s: float = 20_000
    prefix_cache_tokens: int = 10_000  # 5 system prompts: a quarter of the 20 applications
    tokens_per_s: float = 100  # per sequence; 200 would double the rate and the CPU it takes
    ttft_ms: float = 0.0

    def args(self) -> list[str]:
        return [
            "--max-num-seqs", str(self.max_num_seqs),
            "--prefill-tokens-per-s", f"{self.prefill_tokens_per_s:g}",
            "--prefix-cache-tokens", str(self.prefix_cache_tokens),
            "--tokens-per-s", f"{self.tokens_per_s:g}",
            "--ttft-ms", f"{self.ttft_ms:g}",
        ]  # fmt: skip

    def service_s(self, prompt_tokens: float, output_tokens: float) -> float:
        """Seconds a request holds a batch slot with nothing cached: prefill, then decode."""
        prefill = prompt_tokens / self.prefill_tokens_per_s
        return self.ttft_ms / 1000 + prefill + max(output_tokens - 1, 0) / self.tokens_per_s


@dataclass(slots=True)
class Planned:
    """One request: when to send it, what to send, and what the simulator will answer."""

    at: float  # seconds after the start of the run
    session: int
    turn: int
    app: int
    body: dict[str, Any]
    prompt_tokens: int
    output_tokens: int
    reply: str


@dataclass(slots=True)
class Plan:
    workload: str
    sessions: list[list[Planned]] = field(default_factory=list)

    def requests(self) -> list[Planned]:
        return [r for s in self.sessions for r in s]


def zipf_weights(n: int, s: float) -> list[float]:
    return [k**-s for k in range(1, n + 1)]


def vocabulary(rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(VOCAB_WORDS)]


def text(rng: random.Random, words: list[str], chars: int, head: str = "") -> str:
    """Random words after ``head``, cut to exactly ``chars`` characters."""
    out = [head] if head else []
    size = len(head)
    while size < chars:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


@dataclass(frozen=True, slots=True)
class Skeleton:
    """A session's shape, shared by every workload: its start, app, turns and texts."""

    start: float
    app: int
    gaps: tuple[float, ...]
    users: tuple[str, ...]
    outputs: tuple[int, ...]


def skeletons(rate: float, seconds: float, seed: int) -> tuple[list[str], list[Skeleton]]:
    """The applications' system prompts and the sessions of a run of ``seconds``.

    Sessions start as a Poisson process at ``rate`` ÷ (mean turns), so that requests
    arrive at ``rate`` per second once sessions overlap (after about one session's length).
    """
    rng = random.Random(seed)
    words = vocabulary(rng)
    prompts = [
        text(rng, words, rng.randint(*SYSTEM_CHARS), f"You are the assistant of application {a}.")
        for a in range(APPS)
    ]
    weights = zipf_weights(APPS, ZIPF_S)
    session_rate = rate / ((TURNS[0] + TURNS[1]) / 2)
    out: list[Skeleton] = []
    t = rng.expovariate(session_rate)
    while t < seconds:
        turns = rng.randint(*TURNS)
        out.append(
            Skeleton(
                start=t,
                app=rng.choices(range(APPS), weights)[0],
                gaps=tuple(rng.expovariate(1 / THINK_S) for _ in range(turns - 1)),
                users=tuple(
                    " ".join(rng.choices(words, k=rng.randint(*USER_WORDS))) + "?"
                    for _ in range(turns)
                ),
                outputs=tuple(rng.randint(*OUTPUT_TOKENS) for _ in range(turns)),
            )
        )
        t += rng.expovariate(session_rate)
    return prompts, out


def plan(workload: str, rate: float, seconds: float, seed: int) -> Plan:
    """Every request of ``workload``: the sessions' turns that fall within ``seconds``."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    prompts, sessions = skeletons(rate, seconds, seed)
    noise = random.Random(f"{seed}/uniform")
    words = vocabulary(random.Random(f"{seed}/uniform-words"))
    result = Plan(workload)
    for index, sk in enumerate(sessions):
        history: list[dict[str, str]] = []
        planned: list[Planned] = []
        at = sk.start
        for turn, (user, n) in enumerate(zip(sk.users, sk.outputs, strict=True)):
            if turn:
                at += sk.gaps[turn - 1]
            if at >= seconds:
                break
            system = prompts[sk.app]
            if workload == "uniform":  # distinct text, the same length
                system = text(noise, words, len(system), f"Request {index}/{turn}.")
            history.append({"role": "user", "content": user})
            body: dict[str, Any] = {
                "messages": [{"role": "system", "content": system}, *history],
                "max_tokens": OUTPUT_TOKENS[1] + 4,
                "sim": {"tokens": n},
            }
            if workload == "shared-prefix+key":
                body["prompt_cache_key"] = f"session-{index}"
            reply = reply_text(body, "chat")
            planned.append(
                Planned(at, index, turn, sk.app, body, input_tokens_for(body, "chat"), n, reply)
            )
            history.append({"role": "assistant", "content": reply})
        result.sessions.append(planned)
    return result


def capacity(shape: SimShape, replicas: int, requests: list[Planned]) -> dict[str, float]:
    """The fleet's capacity in requests/s with nothing cached (the worst case), from the
    mean time a request holds one of the ``max_num_seqs`` slots of a replica."""
    n = max(len(requests), 1)
    prompt = sum(r.prompt_tokens for r in requests) / n
    output = sum(r.output_tokens for r in requests) / n
    service = shape.service_s(prompt, output)
    return {
        "mean_prompt_tokens": round(prompt, 1),
        "mean_output_tokens": round(output, 1),
        "service_s_cold": round(service, 4),
        "capacity_rps_cold": round(replicas * shape.max_num_seqs / service, 2),
    }
