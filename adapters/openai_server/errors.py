"""OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, with the right status
for every way a request can go wrong: bad input is a 4xx naming what to fix, never a 500."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from adapters.openai_server.schemas import ErrorBody, ErrorDetail
from llama_engine import (
    ContextOverflowError,
    EngineClosedError,
    InvalidParamsError,
    InvalidTokenError,
    KVCacheFull,
    LlamaError,
    OutOfKVMemoryError,
    UnsupportedOperationError,
)

__all__ = ["APIError", "error_response", "from_exception"]


class APIError(Exception):
    """An error to answer with: HTTP status, OpenAI error type and code, the parameter at
    fault, extra headers (Retry-After, WWW-Authenticate)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code, self.param, self.headers = code, param, headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type,
                                           param=self.param, code=self.code)).model_dump()


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def from_exception(e: BaseException) -> APIError:
    """The APIError for an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), code="context_length_exceeded", param="messages")
    if isinstance(e, InvalidParamsError | InvalidTokenError | UnsupportedOperationError):
        return APIError(400, str(e), code="invalid_value")
    if isinstance(e, KVCacheFull | OutOfKVMemoryError):
        return APIError(503, f"the server is out of KV cache memory: {e}; retry shortly",
                        type="server_error", code="kv_cache_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineClosedError):
        return APIError(503, "the engine is shutting down", type="server_error",
                        code="unavailable")
    if isinstance(e, LlamaError):
        return APIError(500, f"generation failed: {e}", type="server_error", code="internal")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                    code="internal")
