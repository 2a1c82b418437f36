"""OpenAI-style error responses, `{"error": {"message", "type", "param", "code"}}`, and the
FastAPI exception handlers that turn every failure at the HTTP edge into one."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error to return to the client as it is; raised anywhere below a route."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model",
                    code="model_not_found")


def invalid_api_key() -> APIError:
    return APIError(401, "Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>'.",
                    type=AUTHENTICATION, code="invalid_api_key")


def from_validation_errors(errors: list[Any]) -> APIError:
    """400 naming the first offending field, e.g. `temperature: Input should be <= 2`."""
    if not errors:
        return bad_request("invalid request")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return bad_request(f"malformed JSON body: {err.get('ctx', {}).get('error', '')}".rstrip(),
                           code="invalid_json")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = _param_path(loc)
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        msg = "field required"
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return bad_request(f"{param}: {msg}{more}" if param else msg + more, param=param,
                       code="invalid_value")


def _param_path(loc: list[str]) -> str | None:
    """Joins a pydantic location, dropping union-member tags such as 'str' or 'list[int]'."""
    parts: list[str] = []
    for p in loc:
        if p.isdigit() and parts:
            parts[-1] += f"[{p}]"
        elif p in {"str", "int", "float", "bool"} or "[" in p or p.endswith("function-after"):
            continue
        else:
            parts.append(p)
    return ".".join(parts) or None


def parse_json(raw: bytes) -> Any:
    """Decodes a request body, raising a 400 APIError for anything but valid JSON."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON body: {exc}", code="invalid_json") from exc


def install_error_handlers(app: FastAPI) -> None:
    """Makes every error leave the server as an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), code=code)
        return err.response(headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal server error: {type(exc).__name__}",
                        type=SERVER_ERROR).response()
