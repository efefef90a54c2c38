"""Daydream's error envelope for every 4xx/5xx:
``{"success": false, "error", "code", "status", "details"}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.details = status, message, code, details
        self.headers = headers


def error_body(status: int, message: str, code: str, details: Any = None) -> dict[str, Any]:
    return {"success": False, "error": message, "code": code, "status": status, "details": details}


def error_response(
    status: int, message: str, code: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, details), status_code=status, headers=headers)


def not_found(what: str = "stream") -> ApiError:
    return ApiError(404, f"{what} not found", f"{what.upper()}S/NOT_FOUND")


_HTTP_CODES = {
    400: "REQUEST/BAD_REQUEST",
    401: "AUTH/UNAUTHORIZED",
    403: "AUTH/FORBIDDEN",
    404: "REQUEST/NOT_FOUND",
    405: "REQUEST/METHOD_NOT_ALLOWED",
    409: "REQUEST/CONFLICT",
    415: "REQUEST/UNSUPPORTED_MEDIA_TYPE",
    422: "REQUEST/VALIDATION",
    429: "REQUEST/RATE_LIMITED",
}


#: what pydantic puts in a location for the branch of a union it tried, not a field the client sent
_BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none"}


def client_location(loc: Any) -> list[str]:
    """A validation error's location as the client wrote it: ``params.seed``, never
    ``params.seed.constrained-int``.
    """
    return [str(p) for p in loc if p != "body" and not _is_branch(p)]


def _is_branch(part: Any) -> bool:
    return isinstance(part, str) and ("-" in part or "[" in part or part in _BRANCH_TAGS)


def _field(loc: Any) -> tuple[Any, ...]:
    """A location up to the first union branch pydantic tried: the field all its branches share."""
    parts = tuple(loc)
    return next((parts[:i] for i, part in enumerate(parts) if _is_branch(part)), parts)


def describe_validation(errors: list[dict[str, Any]]) -> str:
    """One line naming the first bad field, as clients show it to users.

    Where that field is a union (``prompt``: a string or ``[text, weight]`` pairs), the deepest of
    its errors says what is wrong: ``prompt.0.1: finite number``, not ``prompt: a valid string``.
    """
    field = _field(errors[0].get("loc", ()))
    same = [e for e in errors if _field(e.get("loc", ())) == field]
    first = max(same, key=lambda e: len(e.get("loc", ())))
    loc = client_location(first.get("loc", ()))
    where = ".".join(loc) or "body"
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{where}'"
    return f"invalid field '{where}': {first.get('msg', 'invalid')}"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        details = [
            {"loc": client_location(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in errors
        ]
        if any(
            e.get("type") == "json_invalid" for e in errors
        ):  # not JSON at all: a bad request, not a bad field
            return error_response(
                400,
                f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}".rstrip(": "),
                "REQUEST/BAD_REQUEST",
                details,
            )
        return error_response(422, describe_validation(errors), "REQUEST/VALIDATION", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "REQUEST/ERROR")
        return error_response(exc.status_code, str(exc.detail), code, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", "SERVER/INTERNAL")
