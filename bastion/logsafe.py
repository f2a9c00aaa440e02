"""Logging that a client cannot fill or read secrets out of.

aiohttp answers a request its HTTP parser refuses (a control byte in a header, a
smuggling attempt) with a 400 by itself, and logs it at ERROR with a traceback that
quotes the offending line — an ``Authorization`` header included, so a client's key
would land in the log, and every malformed request would add a traceback. Such records
become one line that names only the kind of error, at most one per ``EVERY_S``; the
rest are counted in ``refused``.
"""

from __future__ import annotations

import logging
import time

EVERY_S = 10.0


class MalformedRequests(logging.Filter):
    """For the ``aiohttp.server`` logger: parser refusals without their bytes, rate-limited."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0
        self._said = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _is_http_error(exc):
            return True
        self.refused += 1
        if time.monotonic() - self._said < EVERY_S:
            return False
        self._said = time.monotonic()
        record.msg = "refused malformed HTTP requests (%s); %d so far"
        record.args = (type(exc).__name__, self.refused)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _is_http_error(exc: BaseException) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError

    return isinstance(exc, HttpProcessingError)


def install() -> MalformedRequests:
    """Attach the filter to aiohttp's server logger (once per process)."""
    logger = logging.getLogger("aiohttp.server")
    for existing in logger.filters:
        if isinstance(existing, MalformedRequests):
            return existing
    guard = MalformedRequests()
    logger.addFilter(guard)
    return guard
