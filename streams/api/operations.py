"""How route modules declare what they serve, so that validation, errors and the OpenAPI
document come from one place.

A route module builds :class:`Operation` values (method, path, handler, summary, and the
pydantic models of its JSON body and answer) and calls :func:`add_operations`; the
handler reads its body with :func:`parse_body`, which answers 413 for a body over the
limit and 422 naming the first bad field (``{"error": ..., "field": "items.3.horizons"}``).
``GET /openapi.json`` (:mod:`streams.api.openapi`) is generated from the same list.

>>> from pydantic import BaseModel
>>> class Echo(BaseModel):
...     text: str
>>> async def echo(request: web.Request) -> web.Response:
...     body = await parse_body(request, Echo)
...     return web.json_response(body.model_dump())
>>> app = web.Application()
>>> add_operations(app, [Operation("POST", "/v1/echo", echo, "Say it back", body=Echo)])
>>> [op.path for op in app[OPERATIONS]]
['/v1/echo']
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Operation:
    """One route: what it does, what it takes and answers (for validation and OpenAPI)."""

    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200  # the success status (202 for accepted work)
    tag: str = "forecasts"
    extra_responses: dict[int, str] = field(default_factory=dict)  # status -> description


OPERATIONS: web.AppKey[list[Operation]] = web.AppKey("operations")


def add_operations(app: web.Application, ops: list[Operation]) -> None:
    """Add the routes of ``ops`` to ``app`` and remember them for the OpenAPI document."""
    if OPERATIONS not in app:
        app[OPERATIONS] = []
    for op in ops:
        app.router.add_route(op.method, op.path, op.handler)
        app[OPERATIONS].append(op)


class BodyError(web.HTTPException):
    """A request body that is too large (413), not JSON or not valid (422)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        self.status_code = status
        payload: dict[str, Any] = {"error": message}
        if field is not None:
            payload["field"] = field
        super().__init__(text=json.dumps(payload), content_type="application/json")


async def parse_body(request: web.Request, model: type[M], *, limit: int | None = None) -> M:
    """The JSON body of ``request`` as ``model``; raises :class:`BodyError` (413/422).
    ``limit``: this route's largest body in bytes (default: the application's)."""
    return validate_body(await read_body(request, limit=limit), model)


async def read_body(request: web.Request, *, limit: int | None = None) -> bytes:
    """The raw body of ``request``; :class:`BodyError` 413 over ``limit`` bytes (default:
    the application's). With :func:`validate_body`, what :func:`parse_body` does, for a
    route that validates in a step of its own."""
    if limit is None:
        limit = request.app._client_max_size
    elif limit != request._client_max_size:
        request = request.clone(client_max_size=limit)
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(413, f"body of {request.content_length} bytes is over the limit "
                             f"of {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, f"body is over the limit of {limit} bytes") from None


def validate_body(raw: bytes, model: type[M]) -> M:
    """``raw`` JSON as ``model``; :class:`BodyError` 422 naming the first bad field."""
    try:
        data = json.loads(raw or b"null")
    except ValueError as e:
        raise BodyError(422, f"body is not JSON: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise BodyError(422, f"{where}: {first['msg']}", where) from None
