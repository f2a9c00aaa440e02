"""The OpenAI error object, and the one exception type handlers raise to send it."""

from __future__ import annotations

import orjson

# status -> OpenAI error `type`, as the hosted API names them
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    402: "insufficient_quota",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    502: "upstream_error",
}


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        *,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def redact(self, secret: str) -> None:
        """Cut ``secret`` out of every text the client will read (an upstream may echo the
        credentials Bastion sent it in its own error message)."""
        if not secret:
            return
        self.message = self.message.replace(secret, "[redacted]")
        self.code = self.code.replace(secret, "[redacted]")
        if self.param is not None:
            self.param = self.param.replace(secret, "[redacted]")

    def object(self) -> dict[str, object]:
        return {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }

    def body(self) -> bytes:
        return orjson.dumps({"error": self.object()})


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, "invalid_request", message, param)
