"""``GET /openapi.json`` is a valid OpenAPI 3.1 document listing exactly what is served."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from streams.api.config import ApiSettings
from streams.api.service import ApiService


@pytest.mark.asyncio
async def test_openapi_document_validates_and_lists_every_route() -> None:
    svc = ApiService(ApiSettings(port=0), None)  # no Kafka: the document needs no data
    await svc.start()
    try:
        async with (aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{svc.port}/openapi.json") as r):
            assert r.status == 200
            doc = await r.json()
    finally:
        await svc.stop()
    validate(doc)  # raises on any schema violation (OpenAPI 3.1, JSON Schema 2020-12)
    assert doc["openapi"].startswith("3.1")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {(r.method, r.resource.canonical
               + ("/{filename}" if isinstance(r.resource, web.StaticResource) else ""))
              for r in svc.app.router.routes() if r.method != "HEAD" and r.resource is not None}
    assert listed == served
    assert {("POST", "/v1/predict"), ("POST", "/v1/predict/batch"),
            ("POST", "/v1/predict/async"), ("GET", "/v1/jobs/{id}"),
            ("GET", "/v1/model/info"), ("GET", "/health"), ("GET", "/metrics"),
            ("GET", "/openapi.json")} <= listed
    batch = doc["paths"]["/v1/predict/batch"]["post"]
    ref = batch["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["properties"]["items"]["maxItems"] == 10_000
    assert set(batch["responses"]) == {"200", "413", "422"}
    assert doc["paths"]["/v1/predict/async"]["post"]["responses"]["202"]
