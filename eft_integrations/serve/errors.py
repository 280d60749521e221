"""The server's errors, answered as OpenAI's error JSON (`{"error": {"message", "type",
"param", "code"}}`) with the matching HTTP status.

A 500 never carries the exception's text (it may hold paths, prompts or internals): its body
names the request id, and the log has the traceback under that id.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from .protocol import ErrorInfo, ErrorResponse

__all__ = ["APIError", "ClientDisconnected", "ServerShuttingDown", "internal_error"]


class APIError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.info)

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body().model_dump(mode="json"), status_code=self.status, headers=self.headers
        )


class ClientDisconnected(APIError):
    """The client went away before its answer; nobody reads this response."""

    def __init__(self) -> None:
        super().__init__(499, "client closed the request", code="client_closed_request")


class ServerShuttingDown(APIError):
    """The server is shutting down: it admits no new request, and a request still running
    when the grace period ends is cut short with this error. `Connection: close` sends the
    client's next request elsewhere."""

    def __init__(self, message: str = "the server is shutting down; retry on another server"):
        super().__init__(
            503,
            message,
            type="service_unavailable",
            code="server_shutting_down",
            headers={"Connection": "close", "Retry-After": "1"},
        )


def internal_error(request_id: str) -> APIError:
    """A 500 that names the request id and nothing of the failure itself."""
    return APIError(500, f"internal error (request id {request_id})", type="server_error")
