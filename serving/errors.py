"""The API's one error format, ``{"error": "<field>: <message>", "field": "<field>"}``: what
every refusal says, whether the request parsing, a route, the size limit or FastAPI refuses it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class InputError(ValueError):
    """A request the server refuses: status, the field at fault, and why."""

    def __init__(self, status: int, field: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


def error(status: int, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    """A refusal in the API's error format."""
    body = {"error": f"{field}: {message}", "field": field}
    return JSONResponse(body, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Answer InputError, Starlette's HTTP errors and FastAPI's validation errors in that format."""

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return error(exc.status, exc.field, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(
        request: Request, exc: StarletteHTTPException
    ):  # 404, 405, 413 while streaming
        field = getattr(exc, "field", "request")
        # exc.headers carry what the status needs: a 405's Allow (RFC 9110), a 401's challenge
        return error(exc.status_code, field, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid"}
        # pydantic names the member of a union it tried, as "list[...]": not a field of the body
        where = [p for p in first["loc"] if p not in ("body", "query") and "[" not in str(p)]
        field = ".".join(map(str, where))
        return error(422, field or "body", first["msg"])
