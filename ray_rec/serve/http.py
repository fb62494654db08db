"""HTTP plumbing of a replica: the API key, the body-size limit and bounded error answers.

These live in their own module (not in ``app.py``) because Serve ships the ingress class by
value; helpers in an importable module are shared by reference, with the replica's state.
"""

import hmac
import os
import unicodedata
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

API_KEY_HEADER = "X-API-Key"
OPEN_PATHS = ("/healthz",)  # the only paths answered without the key (liveness probes)
MAX_ERRORS = 10  # validation errors listed in a 422 answer; the rest are only counted
MAX_ERROR_TEXT = 200


class _Replica:
    """The service object of this replica process (set by its constructor)."""

    service: Any = None


REPLICA = _Replica()


def api_key_from_env(name: str) -> str | None:
    """The API key held by environment variable ``name`` (None when ``name`` is empty), stripped:
    a key file or Secret that ends in a newline must not lock every client out.

    Raises:
        RuntimeError: ``name`` is set but the variable is missing or blank.
    """
    if not name:
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        raise RuntimeError(f"api_key_env={name!r} is set but that variable is empty or missing")
    return key


class RequireKey:
    """ASGI middleware: with an API key configured, every path but `OPEN_PATHS` needs the
    ``X-API-Key`` header (compared in constant time), the OpenAPI schema and docs pages included."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        service = REPLICA.service
        expected = service.api_key if service is not None else None
        if scope["type"] == "http" and expected is not None and not scope["path"].endswith(OPEN_PATHS):
            given = dict(scope.get("headers") or []).get(API_KEY_HEADER.lower().encode(), b"")
            if not hmac.compare_digest(given, expected.encode()):
                await JSONResponse({"detail": f"missing or wrong {API_KEY_HEADER} header"}, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a body over the replica's ``max_body_bytes`` gets 413, declared or streamed."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        service = REPLICA.service
        if scope["type"] != "http" or service is None:
            await self.app(scope, receive, send)
            return
        limit = service.args.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await JSONResponse({"detail": f"request body over {limit} bytes"}, 413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body over {limit} bytes")
            return message

        await self.app(scope, limited, send)


def safe_text(value: Any, limit: int = MAX_ERROR_TEXT) -> str:
    """``value`` as printable text of at most ``limit`` characters: control characters and lone
    surrogates (which UTF-8 cannot encode) are written as escapes."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode() for c in text[:limit])
    return text[:limit]


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 naming where and what is wrong, bounded: at most `MAX_ERRORS` entries of location,
    message and type, each sanitised, and never the input itself (FastAPI's own answer echoes
    every bad element: a 300 KB body of empty objects became a 21.8 MB answer)."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [
        {
            "loc": [p if isinstance(p, int) else safe_text(p, 64) for p in list(e.get("loc", ()))[:8]],
            "msg": safe_text(e.get("msg", "")),
            "type": safe_text(e.get("type", ""), 64),
        }
        for e in errors[:MAX_ERRORS]
    ]
    return JSONResponse({"detail": detail, "errors": len(errors)}, status_code=422)
