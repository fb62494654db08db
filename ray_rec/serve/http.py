"""HTTP plumbing of a replica: the body-size limit and the API key check.

These live in their own module (not in ``app.py``) because Serve ships the ingress class by
value; helpers in an importable module are shared by reference, with the replica's state.
"""

import hmac
import math
from typing import Any

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

API_KEY_HEADER = "X-API-Key"


class _Replica:
    """The service object of this replica process (set by its constructor)."""

    service: Any = None


REPLICA = _Replica()


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


async def check_key(request: Request) -> None:
    """FastAPI dependency: the X-API-Key header must match, compared in constant time.

    A coroutine on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread
    hand-off on every request."""
    expected = REPLICA.service.api_key if REPLICA.service is not None else None
    if expected is None:
        return
    given = request.headers.get(API_KEY_HEADER, "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (inf, -inf, nan) as its string: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with FastAPI's list of what is wrong, as its own handler sends, but rendered safely.

    The list echoes the input, and Python's JSON parser accepts ``Infinity`` and ``NaN``, which
    JSON itself has not: FastAPI's handler then fails to render its answer and the client gets a 500
    (``{"timestamps": [Infinity]}`` did, in the generated-requests test)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)
