"""OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``, with the right status.

One mapping from what went wrong to what a client sees, so the official client raises the class
it would raise against OpenAI (AuthenticationError on 401, PermissionDeniedError on 403,
RateLimitError on 429, BadRequestError on 400...). Anything that says how long to wait
(a rate limit, a full queue, a server shutting down) carries ``Retry-After``.
"""

from __future__ import annotations

import math

from starlette.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An HTTP refusal raised inside the server, shaped like OpenAI's."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after, self.type = retry_after, type or TYPES.get(status, "server_error")


def from_exception(exc: BaseException) -> ApiError:
    """The ApiError for an exception: ours as is; zenlm errors by their ``status`` (the access
    errors carry one), engine overload as 503, anything else a user caused as 400."""
    from zenlm.errors import PromptTooLongError, ZenlmError

    if isinstance(exc, ApiError):
        return exc
    name = type(exc).__name__
    if name in ("QueueFull", "EngineStopped"):  # zenlm.infer.engine: imported lazily by the app
        return ApiError(503, str(exc) or "the server is busy", code="overloaded" if name == "QueueFull"
                        else "shutting_down", retry_after=getattr(exc, "retry_after", None) or 1)
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return ApiError(status, str(exc), code=getattr(exc, "code", None),
                        retry_after=getattr(exc, "retry_after", None))
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, ZenlmError):
        return ApiError(400, str(exc), code="invalid_value")
    return ApiError(500, "internal server error", code="internal_error")


def error_response(err: ApiError, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    headers = dict(headers or {})
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if err.status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="zenlm"')
    return JSONResponse(body, status_code=err.status, headers=headers)
