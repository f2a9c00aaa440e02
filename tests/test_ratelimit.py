"""GCRA: N at once, then one per 60/N seconds; no reset at a minute boundary."""

from bastion.ratelimit import MemoryLimiter, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_burst_of_n_then_refused_with_retry_after():
    clock = Clock()
    limiter = MemoryLimiter(clock)
    for i in range(10):
        decision = await limiter.admit("k", rpm=10, tpm=0, tokens=1)
        assert decision.allowed, i
        assert decision.headers["x-ratelimit-remaining-requests"] == str(9 - i)
    refused = await limiter.admit("k", rpm=10, tpm=0, tokens=1)
    assert not refused.allowed and refused.reason == "requests"
    assert 5.9 < refused.retry_after_s <= 6.0  # one slot frees every 6 s
    assert refused.headers["x-ratelimit-limit-requests"] == "10"


async def test_smooth_refill_not_a_minute_reset():
    clock = Clock()
    limiter = MemoryLimiter(clock)
    for _ in range(10):
        assert (await limiter.admit("k", 10, 0, 1)).allowed
    clock.now += 6.0
    assert (await limiter.admit("k", 10, 0, 1)).allowed
    assert not (await limiter.admit("k", 10, 0, 1)).allowed


async def test_tokens_are_charged_worst_case_and_refunded():
    clock = Clock()
    limiter = MemoryLimiter(clock)
    assert (await limiter.admit("k", 0, 1000, 800)).allowed
    assert not (await limiter.admit("k", 0, 1000, 300)).allowed
    limiter.refund("k", 1000, 700)  # the first request used 100 of its 800
    second = await limiter.admit("k", 0, 1000, 300)
    assert second.allowed
    assert second.headers["x-ratelimit-remaining-tokens"] == "600"


async def test_both_limits_must_pass_and_nothing_is_taken_on_refusal():
    clock = Clock()
    limiter = MemoryLimiter(clock)
    assert not (await limiter.admit("k", 5, 100, 500)).allowed
    assert (await limiter.admit("k", 5, 100, 100)).allowed  # requests were not consumed


async def test_unlimited_sends_no_headers_for_that_dimension():
    decision = await MemoryLimiter(Clock()).admit("k", 0, 50, 1)
    assert "x-ratelimit-limit-requests" not in decision.headers
    assert decision.headers["x-ratelimit-limit-tokens"] == "50"


def test_duration_format_matches_openai():
    assert duration(0.017) == "17ms"
    assert duration(1) == "1s"
    assert duration(360) == "6m0s"
    assert duration(2.5) == "2.5s"


async def test_a_limit_is_exact_whatever_its_size():
    """Exactly the limit is admitted at once, one more unit is not; float rounding of
    60/N must not refuse the last unit (w × 60/w is over 60 for w = 29, 58, 79, …)."""
    for limit in (29, 58, 79, 600, 3000, 4_999):
        limiter = MemoryLimiter(Clock())
        assert (await limiter.admit("k", rpm=0, tpm=limit, tokens=limit)).allowed, limit
        assert not (await limiter.admit("k", rpm=0, tpm=limit, tokens=1)).allowed, limit
        one_by_one = MemoryLimiter(Clock())
        for i in range(limit if limit < 1000 else 0):
            assert (await one_by_one.admit("k", rpm=limit, tpm=0, tokens=1)).allowed, (limit, i)


async def test_remaining_counts_what_is_left_exactly():
    for limit in (2, 7, 600):
        limiter = MemoryLimiter(Clock())
        decision = await limiter.admit("k", rpm=limit, tpm=0, tokens=1)
        assert decision.headers["x-ratelimit-remaining-requests"] == str(limit - 1), limit
