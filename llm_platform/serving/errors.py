"""OpenAI-shaped errors: every failure a client sees is one of these, built in one place."""

from __future__ import annotations

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
         503: "service_unavailable", 500: "internal_error"}


class APIError(Exception):
    """An error with its HTTP status, raised anywhere in the serving path."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s
        """Sent as ``Retry-After`` (whole seconds): with 503, when the client may try again."""

    def __reduce__(self):  # picklable with all its fields, so it survives the trip from a Ray replica
        return APIError, (self.status, self.message, self.param, self.code, self.retry_after_s)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(self.retry_after_s)))} if self.retry_after_s else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)
