"""``GET /openapi.json``: an OpenAPI 3.1 document of what the API serves.

Generated at request time from ``app[OPERATIONS]`` (every route module declares its
routes as :class:`~streams.api.operations.Operation` values), so a route added anywhere
appears here; pydantic's JSON Schemas (draft 2020-12, which OpenAPI 3.1 uses) go under
``components/schemas`` and are referred to by ``$ref``. ``/health``, ``/metrics``, the
document itself and static directories are described here.

>>> from streams.api.app import create_app
>>> from streams.api.config import ApiSettings
>>> from streams.api.state import ForecastState
>>> app = create_app(ForecastState(), ApiSettings())
>>> add_routes(app)
>>> sorted(document(app)["paths"])
['/health', '/metrics', '/openapi.json']
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from streams.api.operations import OPERATIONS, Operation

TITLE = "loadcast API"
REF = "#/components/schemas/{model}"
ERROR = {"type": "object", "required": ["error"],
         "properties": {"error": {"type": "string"}, "field": {"type": "string"}}}

_BUILT_IN: dict[str, dict[str, Any]] = {
    "/health": {"get": {
        "summary": "200 while the Kafka feed runs (503 when it is down); endpoints, freshness",
        "operationId": "get_health", "tags": ["service"],
        "responses": {"200": {"description": "feed running",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "503": {"description": "feed down",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
    "/metrics": {"get": {
        "summary": "Prometheus metrics (text exposition format)",
        "operationId": "get_metrics", "tags": ["service"],
        "responses": {"200": {"description": "metrics",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }},
    "/openapi.json": {"get": {
        "summary": "This document", "operationId": "get_openapi", "tags": ["service"],
        "responses": {"200": {"description": "OpenAPI 3.1",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
}


def _operation_id(op: Operation) -> str:
    return op.method.lower() + "_" + re.sub(r"\W+", "_", op.path).strip("_")


def _operation(op: Operation, refs: Mapping[Any, dict[str, Any]]
               ) -> dict[str, Any]:
    success: dict[str, Any] = {"description": "success"}
    if op.response is not None:
        success["content"] = {"application/json": {
            "schema": refs[(op.response, "serialization")]}}
    responses: dict[str, Any] = {str(op.status): success}
    for status, why in sorted(op.extra_responses.items()):
        responses[str(status)] = {"description": why, "content": {
            "application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
    out: dict[str, Any] = {"summary": op.summary, "operationId": _operation_id(op),
                           "tags": [op.tag], "responses": responses}
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in re.findall(r"{(\w+)}", op.path)]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": refs[(op.body, "validation")]}}}
    return out


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s operations and built-in routes."""
    ops: list[Operation] = app.get(OPERATIONS, [])
    wanted: list[tuple[type[BaseModel], Any]] = []
    for op in ops:
        if op.body is not None:
            wanted.append((op.body, "validation"))
        if op.response is not None:
            wanted.append((op.response, "serialization"))
    refs, defs = models_json_schema(list(dict.fromkeys(wanted)),
                                    ref_template=REF)
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas["Error"] = ERROR
    paths: dict[str, dict[str, Any]] = {p: dict(v) for p, v in _BUILT_IN.items()}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    for res in app.router.resources():  # directories served as they are (the page's files)
        if isinstance(res, web.StaticResource):
            paths[res.canonical + "/{filename}"] = {"get": {
                "summary": f"Static files under {res.canonical}",
                "operationId": "get_" + re.sub(r"\W+", "_", res.canonical).strip("_"),
                "tags": ["static"],
                "parameters": [{"name": "filename", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the file"},
                              "404": {"description": "no such file"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": "1",
                 "description": "Forecasts of loadcast served over HTTP."},
        "paths": paths,
        "components": {"schemas": schemas},
    }


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``."""
    return web.json_response(document(request.app))


def add_routes(app: web.Application) -> None:
    """Add ``GET /openapi.json`` to ``app``."""
    app.router.add_get("/openapi.json", openapi)
