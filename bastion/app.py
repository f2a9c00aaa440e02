"""The gateway: HTTP handlers, and the hot path that reads top to bottom.

A POST goes auth → body → model → rate limit → key spend limit → credit → upstream (the
order docs/api.md gives), then settles: the reservations become the actual cost, a ledger
row is queued for the next group commit, unused tokens go back to the limiter. Nothing
on this path waits on the database: keys, leased credit and leased key budgets are in
memory, refreshed in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from bastion.answers import new_request_id
from bastion.auth import KeyTable, well_formed
from bastion.bodyguard import BodyGuard
from bastion.cachesalt import CacheSalts
from bastion.config import Config, ModelConfig, TracingConfig
from bastion.credit import Bucket, CreditBook, Reservation
from bastion.errors import APIError
from bastion.ledger import LedgerWriter
from bastion.metering import NUMBER_TOKENS, Usage, estimate_input, input_bound, plausible
from bastion.metrics import Metrics
from bastion.money import cost_nanos, format_usd
from bastion.periods import period_end, period_start
from bastion.ratelimit import Decision, open_limiter
from bastion.refusals import COUNTED, RefusalCollector, RefusalCounter
from bastion.relay import Call, Relay
from bastion.routing import RoutingCollector
from bastion.sideroutes import ENDPOINT_PATHS, SideEndpoints
from bastion.store import ApiKey, LedgerRow, open_store
from bastion.store.common import now_us
from bastion.store.outbox import KEY_LIMIT_REACHED
from bastion.validation import ClientRequest, parse
from bastion.webhooks.sender import webhook_sender

if TYPE_CHECKING:
    from bastion.tracing import Tracing

log = logging.getLogger("bastion")

GC_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)
DRAIN_GRACE_S = 2.0  # after the drain deadline: time for ended streams to settle
# the cap field a refusal advises when the client sent none (chat: the current name)
_CAP_FIELD = {"responses": "max_output_tokens", "chat": "max_completion_tokens"}


class Gateway:
    def __init__(self, config: Config, replicas: int = 1, seat: str = "") -> None:
        self.config = config
        self.store = open_store(config.database_url, config.lease_ttl_s)
        self.limiter = open_limiter(config.ratelimit.url, replicas=replicas)
        self.keys = KeyTable()
        self.book = CreditBook(self.store)
        self.book.on_distrust = self.end_streams
        self.now_us: Callable[[], int] = now_us  # the clock of spend-limit periods and rows
        self.limit_events: dict[str, int] = {}  # key id -> period of its last key.limit_reached
        self._background: set[asyncio.Task[None]] = set()
        self.writer = LedgerWriter(
            self.store,
            self.book,
            lambda: self.keys.refresh(self.store),
            config.refresh_interval_s,
            config.lease_ttl_s,
            self.written,
            seat=seat,
            inflight=self.inflight_rows,
        )
        self.relay = Relay(
            config.upstreams,
            config.health_check_interval_s,
            client_write_timeout_s=config.server.client_write_timeout_s,
            max_event_bytes=config.server.max_event_bytes,
            models=config.models,  # each model's routing policy (bastion/routing/)
            routing=config.routing,
        )
        self.guard = BodyGuard(config.server.max_json_containers)
        self.cache_salt = CacheSalts(config.server.cache_salt_secret)  # cache_isolation models
        self.metrics = Metrics(self.relay.pool, self.limiter)
        self.metrics.ledger_queue = lambda: len(self.writer.queue)
        self.metrics.book = self.book
        self.metrics.writer = self.writer
        self.metrics.models = {m.id: m.upstreams for m in config.models.values()}
        self.refusals = RefusalCounter(self.store, config.refresh_interval_s)
        self.metrics.registry.register(RefusalCollector(self.refusals))
        self.metrics.registry.register(RoutingCollector(self.relay.router))
        self.webhooks = webhook_sender(self.store, config.webhooks, self.metrics.registry)
        self.tracer = open_tracing(config.tracing, config.models)  # None: off, nothing imported
        # streams in flight: to end if their lease is given up, to checkpoint for crashes
        self.streams: dict[Call, tuple[ApiKey, ClientRequest]] = {}
        self._refused_log = 0.0
        self.draining = False
        self._idle = asyncio.Event()  # set when draining and nothing is in flight
        self.created = int(time.time())

    # ---- lifecycle -------------------------------------------------------------
    async def startup(self, app: web.Application) -> None:
        await self.store.migrate()
        await self.relay.start()
        await self.writer.start()
        self.refusals.start()
        if self.webhooks is not None:
            self.webhooks.start()
        # Start-up objects (modules, config, keys) live as long as the process: out of
        # the collector's sight, and young collections rarer, they cost no pauses.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])

    async def drain(self, app: web.Application) -> None:
        """SIGTERM: the listener is closed; let what is in flight finish, up to the deadline.

        Then streams still running end with the stream error event (their tokens are
        settled as delivered), so that ``cleanup`` writes every row before the exit."""
        self.draining = True
        log.info("draining: %d requests in flight", self.metrics.in_flight)
        if await self._idle_within(self.config.server.drain_timeout_s):
            return
        log.warning("drain deadline: ending %d streams", len(self.streams))
        for call in list(self.streams):
            call.abort("the gateway is shutting down; stream ended")
        await self._idle_within(DRAIN_GRACE_S)

    async def _idle_within(self, seconds: float) -> bool:
        if self.metrics.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), seconds)
        return not self.metrics.in_flight

    async def cleanup(self, app: web.Application) -> None:
        self.guard.close()
        await self.writer.close()
        await self.refusals.close()
        if self.webhooks is not None:
            await self.webhooks.close()
        await self.relay.close()
        await self.limiter.close()
        await self.store.close()
        if self.tracer is not None:  # last: the spans of the drain are flushed too
            await self.tracer.close()

    # ---- the hot path -----------------------------------------------------------
    async def post(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = new_request_id()
        trace = None if self.tracer is None else self.tracer.request(endpoint, request_id)
        headers = {"x-request-id": request_id}
        key: ApiKey | None = None
        req: ClientRequest | None = None
        call: Call | None = None
        reservation: Reservation | None = None
        row: LedgerRow | None = None
        failure: APIError | None = None  # what the client was answered, for the trace
        worst_tokens = 0
        limited = False  # the limiter's headers are in ``headers``
        self.metrics.in_flight += 1
        try:
            if self.draining:
                raise _draining()
            key = self.authenticate(request)
            raw = await self.read_body(request)
            if len(raw) > self.guard.max_containers:  # else it cannot hold that many
                await self.guard.check(raw)
            req = parse(raw, endpoint)
            model = self.resolve(req.model, endpoint, key)
            cap = self.output_cap(req, model)
            bound = input_bound(req.body, req.items, self.config.metering, model.image_tokens)
            worst_tokens = bound + cap * req.n
            rpm, tpm = self.limits(key)
            if tpm and worst_tokens > tpm:
                raise _over_tpm(worst_tokens, tpm, bound, cap, req, endpoint)
            decision = await self.admit(key, rpm, tpm, worst_tokens)
            headers.update(decision.headers)
            limited = True
            worst_cost = cost_nanos(bound, cap * req.n, model.input_price, model.output_price)
            try:
                reservation = await self.reserve(key, worst_cost, bound, cap, endpoint)
            except APIError:  # refused: the tokens admitted above were never used
                self.limiter.refund(key.id, tpm, worst_tokens)
                raise
            call = self.prepare(
                request_id, endpoint, req, model, cap, bound, headers, key.account_id
            )
            call.epoch = reservation.epoch
            call.trace = trace
            if call.stream:
                self.streams[call] = (key, req)
            response = await self.relay.send(request, call, req.body)
            self.metrics.overhead[endpoint].observe(
                max(0.0, time.perf_counter() - started - call.upstream_s)
            )
            self.metrics.ttft[endpoint].observe(call.first_byte_at - started)
            return response
        except asyncio.CancelledError:  # the client went away
            if call is not None:
                call.status = "cancelled"
            raise
        except APIError as exc:
            failure = exc
            if call is not None:
                call.status = str(exc.status)
                if call.upstream is not None:  # an upstream's message, relayed: never our key
                    exc.redact(call.upstream.api_key)
            else:
                if key is not None and exc.status in COUNTED:
                    self.refusals.count(
                        exc.status, exc.code, key.account_id, key.account_name, key.id
                    )
                if key is not None and not limited and "retry-after" not in exc.headers:
                    headers.update(await self.limiter.peek(key.id, *self.limits(key)))
            headers.update(exc.headers)
            self.metrics.requests[endpoint, str(exc.status)] += 1
            return web.Response(
                body=exc.body(),
                status=exc.status,
                headers=headers,
                content_type="application/json",
            )
        finally:
            self.metrics.in_flight -= 1
            if self.draining and not self.metrics.in_flight:
                self._idle.set()
            if call is not None and call.stream:
                self.streams.pop(call, None)
            if reservation is not None and key is not None and req is not None:
                row = self.settle(key, req, call, reservation, worst_tokens, endpoint)
            if trace is not None:
                trace.end(key, req, call, row, failure)

    def authenticate(self, request: web.Request) -> ApiKey:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not token or scheme.lower() != "bearer":
            self.refusals.count(401, "invalid_api_key")
            raise APIError(
                401,
                "invalid_api_key",
                "Missing API key: send 'Authorization: Bearer qbt_…'.",
            )
        token = token.strip()
        try:
            key = self.keys.get(token)
        except UnicodeEncodeError:  # bytes that are not UTF-8: not a key
            key = None
        if key is None:
            self.refusals.count(401, "invalid_api_key")
            if not well_formed(token):  # never echo what is not a key's shape
                raise APIError(
                    401,
                    "invalid_api_key",
                    "Malformed API key: a key is 'qbt_' and at least 32 letters, digits, '-'"
                    " or '_'.",
                )
            raise APIError(401, "invalid_api_key", f"Incorrect API key provided: {token[:8]}…")
        if key.revoked:
            self.refusals.count(401, "invalid_api_key", key.account_id, key.account_name, key.id)
            raise APIError(401, "invalid_api_key", f"This API key has been revoked: {key.prefix}…")
        if key.expires_at is not None and key.expires_at <= self.now_us():
            self.refusals.count(401, "invalid_api_key", key.account_id, key.account_name, key.id)
            raise APIError(401, "invalid_api_key", "This API key has expired.")
        return key

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.config.server.max_body_bytes
        if (request.content_length or 0) > limit:
            raise _too_large(limit)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(limit) from None

    def resolve(self, name: str, endpoint: str, key: ApiKey) -> ModelConfig:
        """The model asked for: unknown is 400; not on the key's allow-list is 403, checked
        before the endpoint, so a key learns nothing about a model it may not use."""
        model = self.config.models.get(name)
        if model is None:
            raise APIError(
                400,
                "model_not_found",
                f"The model '{name}' does not exist. GET /v1/models lists the models you can use.",
                "model",
            )
        if key.models is not None and name not in key.models:
            raise APIError(
                403,
                "model_not_allowed",
                f"This API key may not use the model '{name}'. GET /v1/models lists the models"
                " it can use.",
                "model",
            )
        if endpoint not in model.endpoints:
            other = next(iter(model.endpoints))
            raise APIError(
                400,
                "model_not_found",
                f"The model '{name}' is not served on {ENDPOINT_PATHS[endpoint]}; "
                f"use {ENDPOINT_PATHS[other]} instead.",
                "model",
            )
        return model

    def output_cap(self, req: ClientRequest, model: ModelConfig) -> int:
        """The cap the upstream will use; every cap field sent must fit the model."""
        for name, value in req.caps:
            if value > model.max_output_tokens:
                raise APIError(
                    400,
                    "invalid_request",
                    f"'{name}' is {value}; {model.id} allows at most "
                    f"{model.max_output_tokens} output tokens.",
                    name,
                )
        return model.max_output_tokens if req.cap is None else req.cap

    def limits(self, key: ApiKey) -> tuple[int, int]:
        defaults = self.config.ratelimit
        rpm = defaults.default_rpm if key.rpm is None else key.rpm
        tpm = defaults.default_tpm if key.tpm is None else key.tpm
        return rpm, tpm

    async def admit(self, key: ApiKey, rpm: int, tpm: int, tokens: int) -> Decision:
        decision = await self.limiter.admit(key.id, rpm, tpm, tokens)
        if not decision.allowed:
            wait = max(decision.retry_after_s, 0.001)
            limit = f"{rpm} requests" if decision.reason == "requests" else f"{tpm} tokens"
            raise APIError(
                429,
                "rate_limit_exceeded",
                f"Rate limit reached for this key: {limit} per minute. "
                f"Please try again in {wait:.3f}s.",
                headers={
                    **decision.headers,
                    "retry-after": str(max(1, int(-(-wait // 1)))),
                    "retry-after-ms": str(max(1, int(wait * 1000))),
                },
            )
        return decision

    async def reserve(
        self, key: ApiKey, amount: int, bound: int, cap: int, endpoint: str
    ) -> Reservation:
        """Hold the worst case against the key's spend limit (if it has one) for the period
        it is admitted in, then against the account's credit; a refusal by either is a 402.
        If the account's hold is not had (refused, store down, client gone), the key's
        goes back."""
        budget = None
        if key.spend_limit is not None:
            bucket = (key.id, period_start(key.limit_reset, self.now_us()))
            self.book.limit(bucket, key.spend_limit)
            budget = await self.hold(bucket, amount)
            if budget is None:
                self.limit_reached(key, bucket[1])
                raise self.key_limit_exceeded(key, bucket, amount, bound, cap, endpoint)
        try:
            reservation = await self.hold(key.account_id, amount)
            if reservation is None:
                raise self.insufficient(key, amount, bound, cap, endpoint)
        except BaseException:
            if budget is not None:
                self.book.release(budget)
            raise
        reservation.key = budget
        return reservation

    async def hold(self, bucket: Bucket, amount: int) -> Reservation | None:
        """Hold ``amount`` in an account's credit or a key's budget for a period; None if
        it does not fit, 503 if the store cannot confirm what is leased."""
        try:
            return await self.book.reserve(bucket, amount)
        except Exception as exc:  # StoreUnavailable, or the store failed to grant a lease
            if time.monotonic() - self._refused_log > 10:  # a line per 10 s, not per request
                self._refused_log = time.monotonic()
                log.warning("credit store unavailable (%s): answering 503", type(exc).__name__)
            self.metrics.store_refusals += 1
            raise APIError(
                503,
                "service_unavailable",
                "Credit cannot be checked right now (billing store unreachable); retry shortly.",
                type="server_error",
            ) from None

    def insufficient(
        self, key: ApiKey, needed: int, bound: int, cap: int, endpoint: str
    ) -> APIError:
        available = max(0, self.book.available(key.account_id))
        field = _CAP_FIELD[endpoint]
        return APIError(
            402,
            "insufficient_funds",
            f"Insufficient credit: ${format_usd(available)} available, this request needs up "
            f"to ${format_usd(needed)} (input ≤ {bound} tokens, output cap {cap} tokens). "
            f"Add credit, or send a lower '{field}'.",
        )

    def key_limit_exceeded(
        self, key: ApiKey, bucket: tuple[str, int], needed: int, bound: int, cap: int, endpoint: str
    ) -> APIError:
        limit = key.spend_limit or 0
        left = min(self.book.available(bucket), limit)
        field = _CAP_FIELD[endpoint]
        every = "" if key.limit_reset == "never" else f" {key.limit_reset}"
        end = period_end(key.limit_reset, bucket[1])
        resets = "It does not reset." if end is None else f"The limit resets at {_iso(end)}."
        return APIError(
            402,
            "key_limit_exceeded",
            f"Key spend limit reached: ${format_usd(left)} of this key's ${format_usd(limit)}"
            f"{every} limit is left, this request needs up to ${format_usd(needed)} (input ≤"
            f" {bound} tokens, output cap {cap} tokens). {resets} Send a lower '{field}', or"
            " ask the account owner to raise the limit.",
            field,
        )

    def limit_reached(self, key: ApiKey, period: int) -> None:
        """Record the ``key.limit_reached`` webhook event once per key and period, off the
        request path. Its id is made from both, so replicas refusing the same key record
        one event between them."""
        if self.limit_events.get(key.id) == period:
            return
        self.limit_events[key.id] = period
        end = period_end(key.limit_reset, period)
        data = {
            "key_id": key.id,
            "account": key.account_name,
            "account_id": key.account_id,
            "limit": format_usd(key.spend_limit or 0),
            "limit_reset": key.limit_reset,
            "period_start": _iso(period),
            "resets_at": None if end is None else _iso(end),
        }

        async def record() -> None:
            try:
                await self.store.add_event(f"evt_limit_{key.id}_{period}", KEY_LIMIT_REACHED, data)
            except Exception as exc:  # the store is down: the next refusal tries again
                self.limit_events.pop(key.id, None)
                log.warning("key.limit_reached for %s not recorded: %s", key.id, exc)

        task = asyncio.create_task(record())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def prepare(
        self,
        request_id: str,
        endpoint: str,
        req: ClientRequest,
        model: ModelConfig,
        cap: int,
        bound: int,
        headers: dict[str, str],
        account_id: str,
    ) -> Call:
        """The upstream body: the client's, except the model/cap/usage changes docs/api.md lists."""
        body = req.body
        changed = False
        if model.renamed:
            body["model"] = model.upstream_model
            changed = True
        if model.cache_isolation != "none":  # the account's own salt: never the client's
            body["cache_salt"] = self.cache_salt(account_id)
            changed = True
        if req.cap is None:
            body[req.cap_field] = cap
            changed = True
        elif len(req.caps) > 1 and body.get("max_tokens") != cap:
            body["max_tokens"] = cap  # both chat caps say what is reserved, whichever is read
            changed = True
        strip_usage = False
        if endpoint == "chat" and req.stream:
            options = body.get("stream_options") or {}
            if not options.get("include_usage"):
                body["stream_options"] = {**options, "include_usage": True}
                strip_usage = changed = True
        return Call(
            request_id=request_id,
            endpoint=endpoint,
            model=model,
            payload=orjson.dumps(body) if changed else req.raw,
            stream=req.stream,
            store_true=req.store_true,
            strip_usage=strip_usage,
            headers=headers,
            input_bound=bound,
            output_cap=cap * req.n,
        )

    def settle(
        self,
        key: ApiKey,
        req: ClientRequest,
        call: Call | None,
        reservation: Reservation,
        worst_tokens: int,
        endpoint: str,
    ) -> LedgerRow | None:
        """Reservation → actual cost; one ledger row per request that reached the upstream
        (returned, for the trace)."""
        tpm = self.limits(key)[1]
        if call is None or not call.reached:
            self.book.release(reservation)
            self.limiter.refund(key.id, tpm, worst_tokens)
            return None
        m = self.metrics
        usage = call.usage
        if usage is None:
            usage = self.estimate(call, req)
        elif not plausible(usage, call.input_bound, call.output_cap):
            log.warning(
                "request %s: upstream %s reported impossible usage %s (input bound %d, output"
                " cap %d); charged the admitted worst case",
                call.request_id, call.upstream.name if call.upstream else "?", usage,
                call.input_bound, call.output_cap,
            )  # fmt: skip
            m.usage_rejected += 1
            usage = Usage(call.input_bound, call.output_cap, estimated=True)
        model = call.model
        cost = model.cost(usage)
        leased = self.book.settle(reservation, cost)
        row = LedgerRow(
            request_id=call.request_id,
            account_id=key.account_id,
            key_id=key.id,
            model=model.id,
            endpoint=endpoint,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost=cost,
            estimated=usage.estimated,
            status=call.status,
            created_at=self.now_us(),
            cached_input_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            leased=leased,
        )
        if reservation.key is not None:  # the key's spend limit: the period it was admitted in
            row.key_period = reservation.key.bucket[1]
            row.key_leased = self.book.settle(reservation.key, cost)
        self.writer.append(row, reservation.epoch)
        self.limiter.refund(key.id, tpm, worst_tokens - usage.input_tokens - usage.output_tokens)
        m.requests[endpoint, call.status] += 1
        m.tokens[model.id, "input"] += usage.input_tokens
        if usage.cached_tokens:
            m.tokens[model.id, "cached_input"] += usage.cached_tokens
        m.tokens[model.id, "output"] += usage.output_tokens
        m.cost[model.id] += cost
        m.estimated += usage.estimated
        return row

    def estimate(self, call: Call, req: ClientRequest) -> Usage:
        """No usage report: charge what was produced (within the cap); nothing if nothing was.

        Input is estimated from the prompt's text (``metering.estimate_input``)."""
        if call.deltas:
            output = call.deltas
        elif call.body_bytes:
            output = -(-call.body_bytes // 4)
        else:
            return Usage(0, 0, estimated=False)
        if call.input_estimate < 0:  # once per request: checkpoints ask every second
            media = call.model.image_tokens or self.config.metering.image_tokens
            estimate = estimate_input(req.body, req.items, media)
            call.input_estimate = min(estimate, call.input_bound)
        return Usage(call.input_estimate, min(output, call.output_cap), estimated=True)

    def written(self, rows: list[LedgerRow]) -> None:
        """Rows are durable: make uncharged money loud (metric, warning)."""
        for row in rows:
            if row.uncharged:
                self.metrics.uncharged += row.uncharged
                log.warning(
                    "request %s of account %s: %s USD of its %s USD cost could not be collected"
                    " (uncharged)",
                    row.request_id, row.account_id, format_usd(row.uncharged),
                    format_usd(row.cost),
                )  # fmt: skip

    def inflight_rows(self, skip: set[str]) -> tuple[list[LedgerRow], set[str]]:
        """What each stream in flight (but those in ``skip``) would be charged if this
        process died now; and the ids of every stream in flight."""
        rows = []
        ids = set()
        now = self.now_us()
        for call, (key, req) in list(self.streams.items()):
            if not call.reached:
                continue
            ids.add(call.request_id)
            if call.request_id in skip:
                continue
            usage = self.estimate(call, req)
            row = LedgerRow(
                call.request_id, key.account_id, key.id, call.model.id, call.endpoint,
                usage.input_tokens, usage.output_tokens, call.model.cost(usage), True,
                "cancelled", now,
            )  # fmt: skip
            rows.append(row)
        return rows, ids

    def end_streams(self, why: str) -> None:
        """The leases were given up: end the streams admitted under them (stream error)."""
        for call in list(self.streams):
            if call.epoch != self.book.epoch:
                call.abort("the gateway lost contact with its billing store; stream ended")


def _iso(us: int) -> str:
    """µs since the epoch as UTC ISO 8601, to the second: 2026-12-06T00:00:00Z."""
    return datetime.fromtimestamp(us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _draining() -> APIError:
    """A fresh error each time: one shared instance would grow its traceback per raise."""
    return APIError(
        503,
        "service_unavailable",
        "This gateway is shutting down; retry (another replica will answer).",
        type="server_error",
    )


def _over_tpm(
    tokens: int, tpm: int, bound: int, cap: int, req: ClientRequest, endpoint: str
) -> APIError:
    """A worst case over the whole TPM can never be admitted: say which cap would fit.

    Without a cap the worst case uses the model's maximum output, which a small TPM
    cannot hold; the largest cap that fits is exact (input bound + cap × n ≤ TPM)."""
    if req.cap is not None:
        field = req.cap_field
    else:
        field = _CAP_FIELD[endpoint]
    why = (
        f"input bound {bound:,} + output cap {cap:,}"
        + (f" × n={req.n}" if req.n > 1 else "")
        + ("" if req.cap is not None else ", the model's maximum, as no cap was sent")
    )
    # a cap the client adds is one more number in the body: the bound grows by its allowance
    fits = (tpm - bound - (NUMBER_TOKENS if req.cap is None else 0)) // req.n
    if fits >= 1:
        advice, param = f"Send '{field}' of at most {fits:,}.", field
    else:
        advice = "The input alone is over the limit: shorten it."
        param = "input" if endpoint == "responses" else "messages"
    return APIError(
        429,
        "rate_limit_exceeded",
        f"Request too large: its worst case is {tokens:,} tokens ({why}), over this key's "
        f"limit of {tpm:,} tokens per minute. {advice}",
        param,
        headers={"x-should-retry": "false"},
    )


def _too_large(limit: int) -> APIError:
    return APIError(413, "request_too_large", f"The request body is over {limit} bytes.")


def open_tracing(config: TracingConfig, models: Iterable[str]) -> Tracing | None:
    """[tracing] on: the OpenTelemetry tracer, its package imported only now; off: None."""
    if not config.otlp_endpoint:
        return None
    return tracing_class()(config, models)


def tracing_class() -> type[Tracing]:
    """The tracer's class, or the start refused naming the package to install (``serve``
    asks before it starts workers, so none is restarted in a loop for want of it)."""
    try:
        from bastion.tracing import Tracing
    except ImportError as exc:
        raise SystemExit(
            f"error: [tracing] otlp_endpoint is set but OpenTelemetry cannot be imported ({exc});"
            " install it with: pip install 'bastion[tracing]'"
        ) from None
    return Tracing


GATEWAY = web.AppKey("gateway", Gateway)
"""The app's Gateway, for code that holds only the aiohttp application (tests, tools)."""


def create_app(config: Config, replicas: int = 1, seat: str = "") -> web.Application:
    """``seat``: where this process serves (host:port/worker), so the next process there
    can reclaim at once what this one held if it dies."""
    gateway = Gateway(config, replicas, seat)
    # the body limit is enforced by read_body; aiohttp's own is set just above it
    app = web.Application(client_max_size=config.server.max_body_bytes + 1)
    app[GATEWAY] = gateway
    app.on_startup.append(gateway.startup)
    app.on_shutdown.append(gateway.drain)
    app.on_cleanup.append(gateway.cleanup)

    async def responses(request: web.Request) -> web.StreamResponse:
        return await gateway.post(request, "responses")

    async def chat(request: web.Request) -> web.StreamResponse:
        return await gateway.post(request, "chat")

    r = app.router
    r.add_post("/v1/responses", responses)
    r.add_post("/v1/chat/completions", chat)
    side = SideEndpoints(gateway)
    side.add_routes(app)
    from bastion.selfservice import add_selfservice_routes  # it imports this module

    add_selfservice_routes(app, gateway)
    if config.admin_token:
        from bastion.admin import add_admin_routes
        from bastion.console import add_console_routes  # /console: behind the same token

        add_admin_routes(app, gateway)
        add_console_routes(app, gateway)
    r.add_route("*", "/{tail:.*}", side.not_found)
    return app
