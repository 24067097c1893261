"""Request and answer models of the prediction API (validation and the OpenAPI document).

A question names one endpoint (``endpoint_id``) or every endpoint of an ``api`` (in
``region`` if given), and horizons in model steps or instants (epoch ms or ISO 8601; a
time without zone is UTC); neither means every forecast point.

>>> PredictItem.model_validate({"endpoint_id": "e1", "times": ["2026-12-03T10:00:00Z"]}).times
[1796292000000]
>>> PredictItem.model_validate({"api": "orders", "horizons": [1, 6]}).region is None
True
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NamedTuple, cast

import msgspec
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SkipValidation,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from streams.api.operations import BodyError, validate_body

MAX_POINTS = 64  # horizons or times in one question
MAX_BATCH_ITEMS = 10_000
MAX_ASYNC_ITEMS = 1_000_000


def _epoch_ms(value: Any) -> Any:
    """An instant as epoch ms: ints pass, ISO 8601 strings are read (UTC without zone)."""
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("an instant is epoch ms or an ISO 8601 time") from None
        return round((t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp() * 1000)
    return value


Instant = Annotated[int, BeforeValidator(_epoch_ms), WithJsonSchema(
    {"anyOf": [{"type": "integer", "description": "epoch ms"},
               {"type": "string", "format": "date-time"}]})]


class PredictItem(BaseModel):
    """One question: which endpoints, which horizons or instants."""

    model_config = ConfigDict(extra="forbid")

    endpoint_id: str | None = Field(None, min_length=1, max_length=256,
                                    description="one endpoint (or give api)")
    api: str | None = Field(None, min_length=1, max_length=256, validate_default=True,
                            description="every endpoint of this api (with region: of it there)")
    region: str | None = Field(None, min_length=1, max_length=256)
    horizons: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, max_length=MAX_POINTS,
        description="steps ahead (0 = now); between forecast points: interpolated")
    times: list[Instant] | None = Field(
        None, min_length=1, max_length=MAX_POINTS,
        description="instants, epoch ms or ISO 8601 (UTC without zone); interpolated")

    @field_validator("api")
    @classmethod
    def _one_target(cls, api: str | None, info: ValidationInfo) -> str | None:
        endpoint = info.data.get("endpoint_id")
        if (endpoint is None) == (api is None):
            raise ValueError("give endpoint_id or api (with region), exactly one of them")
        return api

    @field_validator("times")
    @classmethod
    def _times(cls, times: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if times is not None and info.data.get("horizons") is not None:
            raise ValueError("give horizons or times, not both")
        return times


class Question(NamedTuple):
    """A validated question, small: a million of them are a job's input (a tuple of
    strings and ints, which the cyclic garbage collector stops tracking)."""

    endpoint_id: str | None
    api: str | None
    region: str | None
    horizons: tuple[int, ...] | None
    times: tuple[int, ...] | None


def compact(raw: Any, where: str) -> Question:
    """``raw`` validated as a :class:`PredictItem`, as a :class:`Question`; a bad one
    raises :class:`BodyError` 422 naming ``where`` and the field."""
    try:
        it = PredictItem.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join([where, *(str(p) for p in first["loc"])])
        raise BodyError(422, f"{field}: {first['msg']}", field) from None
    return Question(it.endpoint_id, it.api, it.region,
                    None if it.horizons is None else tuple(it.horizons),
                    None if it.times is None else tuple(it.times))


def _bounded(data: Any, limit: int) -> Any:
    """413 naming ``items`` before validating more items than one call may carry."""
    if isinstance(data, dict) and isinstance(data.get("items"), list) \
            and len(data["items"]) > limit:
        raise BodyError(413, f"items: {len(data['items'])} items, at most {limit} in one call",
                        "items")
    return data


class BatchRequest(BaseModel):
    """Up to 10,000 questions answered in one call, each on its own."""

    # the documented body, and what a bad one is told (the route decodes with BatchBody
    # first: see decode_batch); this docstring is the schema's description
    model_config = ConfigDict(extra="forbid")

    items: list[PredictItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)

    @model_validator(mode="before")
    @classmethod
    def _size(cls, data: Any) -> Any:
        return _bounded(data, MAX_BATCH_ITEMS)


Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
PointList = msgspec.Meta(min_length=1, max_length=MAX_POINTS)


class BatchItem(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`PredictItem` as msgspec decodes it, for the batch route: the same fields and
    rules (horizons and times as tuples; times as epoch ms once decoded). msgspec decodes
    and validates a 10,000-item body in one pass in C, several times faster than json +
    pydantic. It is strict (``"5"`` is not ``5``, as pydantic's lax mode allows): what it
    refuses, :func:`decode_batch` hands to :class:`BatchRequest`, which stays the
    documented schema and says what is wrong."""

    endpoint_id: Name | None = None
    api: Name | None = None
    region: Name | None = None
    horizons: Annotated[tuple[Annotated[int, msgspec.Meta(ge=0)], ...], PointList] | None = None
    times: Annotated[tuple[int | str, ...], PointList] | None = None

    def __post_init__(self) -> None:
        """The rules across fields (msgspec turns a ValueError into its ValidationError)."""
        if (self.endpoint_id is None) == (self.api is None):
            raise ValueError("give endpoint_id or api (with region), exactly one of them")
        if self.times is not None:
            if self.horizons is not None:
                raise ValueError("give horizons or times, not both")
            self.times = tuple(_epoch_ms(t) for t in self.times)

    def question(self) -> Question:
        """This item as a :class:`Question` (its times are epoch ms by now)."""
        return Question(self.endpoint_id, self.api, self.region, self.horizons,
                        cast("tuple[int, ...] | None", self.times))


class BatchBody(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`BatchRequest` as msgspec decodes it."""

    items: Annotated[list[BatchItem], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS)]


_BATCH_DECODER = msgspec.json.Decoder(BatchBody)


def decode_batch(raw: bytes) -> list[BatchItem] | list[Question]:
    """The items of a batch body. msgspec decodes and validates it in one pass; a body it
    refuses is read again by :class:`BatchRequest` (pydantic), so errors are what the
    document says: :class:`BodyError` 413 over 10,000 items, 422 naming the first bad
    field, or, for a body only pydantic's lax mode accepts, the questions it read.

    >>> decode_batch(b'{"items": [{"endpoint_id": "e1", "horizons": [1, 6]}]}')[0].horizons
    (1, 6)
    >>> decode_batch(b'{"items": [{"endpoint_id": "e1", "horizons": ["6"]}]}')[0].horizons
    (6,)
    >>> import json
    >>> try:
    ...     decode_batch(b'{"items": [{"endpoint_id": "e1"}, {"horizons": [1]}]}')
    ... except BodyError as e:
    ...     print(e.status_code, json.loads(e.text)["field"])
    422 items.1.api
    """
    try:
        return _BATCH_DECODER.decode(raw).items
    except msgspec.MsgspecError:
        items = validate_body(raw, BatchRequest).items  # raises BodyError, or lax input
        return [Question(it.endpoint_id, it.api, it.region,
                         None if it.horizons is None else tuple(it.horizons),
                         None if it.times is None else tuple(it.times)) for it in items]


class AsyncRequest(BaseModel):
    """Up to 1,000,000 questions answered in the background. The envelope is checked
    here; the items one by one by the route (:func:`compact`), a chunk at a time."""

    model_config = ConfigDict(extra="forbid")

    items: list[SkipValidation[PredictItem]] = Field(min_length=1, max_length=MAX_ASYNC_ITEMS)

    @model_validator(mode="before")
    @classmethod
    def _size(cls, data: Any) -> Any:
        return _bounded(data, MAX_ASYNC_ITEMS)


class ForecastValue(BaseModel):
    """The forecast at one horizon or instant, with utilization of the capacity."""

    horizon: float = Field(description="steps ahead (fractional when interpolated)")
    at: int = Field(description="epoch ms")
    mean: float
    lower: float = Field(description="lower edge of the 90 % band")
    upper: float = Field(description="upper edge of the 90 % band")
    utilization: float | None = Field(description="mean / capacity (None without capacity)")
    utilization_upper: float | None = Field(description="upper / capacity")


class EndpointForecast(BaseModel):
    """One endpoint's answer: identity, freshness, capacity, the asked points."""

    endpoint_id: str
    api: str
    region: str
    computed_at: int
    valid_until: int
    age_s: float = Field(description="seconds since the score was computed")
    stale: bool = Field(description="true once valid_until has passed")
    model: str
    step_seconds: int
    score: float
    capacity_rps: float
    capacity_source: str = Field(description="CONFIGURED, LEARNED or DEFAULT (a guess)")
    current_rps: float
    points: list[ForecastValue]


class PredictResponse(BaseModel):
    """The forecasts of the endpoints the question named."""

    predictions: list[EndpointForecast]


class ItemResult(BaseModel):
    """The answer to item ``index``: its predictions, or an error naming the field."""

    index: int
    predictions: list[EndpointForecast] | None = None
    error: str | None = None
    field: str | None = None


class BatchResponse(BaseModel):
    """One result per item, in order; ``errors`` counts the items that failed."""

    results: list[ItemResult]
    errors: int


class JobResponse(BaseModel):
    """An async job: its state and, once succeeded, a page of its results."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed"]
    items: int
    done: int = Field(description="items answered so far")
    errors: int = Field(description="items answered with an error")
    error: str | None = Field(None, description="why the job failed")
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    expires_at: int | None = Field(None, description="results are dropped after this")
    offset: int = 0
    next_offset: int | None = Field(None, description="offset of the next page, if any")
    results: list[ItemResult] = Field(default_factory=list)


class ModelKind(BaseModel):
    """Endpoints whose latest score comes from one kind of model."""

    model: str
    endpoints: int
    stale: int
    newest_computed_at: int


class ModelInfo(BaseModel):
    """What the forecasts come from and how fresh they are."""

    endpoints: int
    stale_endpoints: int
    newest_score_age_s: float | None
    oldest_score_age_s: float | None
    kinds: list[ModelKind]
    global_models: dict[str, dict[str, Any]] = Field(
        description="family -> latest GlobalModel (version, round, created_at, ...)")
