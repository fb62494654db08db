"""Request and response bodies of the HTTP API (they make the published OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints

# Hard ceilings of every request list and id, checked while the body is parsed: a list past its
# ceiling fails at once with one error, instead of one error per element (each echoing its input).
# The replica's own limits (`ServeArgs.max_history`, ...) are lower and configurable.
MAX_LIST = 10_000
MAX_ID_CHARS = 512


# Strict strings also refuse a lone surrogate (JSON's "\\ud800", which UTF-8 cannot encode).
TextId = Annotated[StrictStr, StringConstraints(max_length=MAX_ID_CHARS)]
ItemId = StrictInt | TextId
Ids = Annotated[list[ItemId], Field(max_length=MAX_LIST)]
Times = Annotated[list[float], Field(max_length=MAX_LIST)]
AnswerId = StrictInt | StrictStr  # ids in answers come from the catalog, unchecked


class ScoreRequest(BaseModel):
    """Score given candidates for one user."""

    model_config = ConfigDict(extra="forbid")
    history: Ids = Field(..., description="clicked item ids, oldest first (raw ids)")
    candidates: Ids = Field(..., description="item ids to score, in the order to return")
    timestamps: Times | None = Field(
        None, description="optional click time of each history item (epoch seconds or milliseconds), oldest first"
    )


class RecommendRequest(BaseModel):
    """Top-k of the whole catalog for one user."""

    model_config = ConfigDict(extra="forbid")
    history: Ids = Field(..., description="clicked item ids, oldest first (raw ids)")
    k: StrictInt = Field(10, description="how many items to return")
    exclude_history: bool = Field(True, description="never recommend an item of the history")
    timestamps: Times | None = Field(
        None, description="optional click time of each history item (epoch seconds or milliseconds), oldest first"
    )


class ScoreResponse(BaseModel):
    model_version: str
    scores: list[float | None] = Field(..., description="relevance per candidate, in order; null = unknown item")
    unknown_history: list[AnswerId]
    unknown_candidates: list[AnswerId]
    fallback: str | None = Field(
        None, description="'popularity' when no history item was known: scores are training click counts"
    )


class RecommendedItem(BaseModel):
    item_id: AnswerId
    score: float


class RecommendResponse(BaseModel):
    model_version: str
    items: list[RecommendedItem]
    unknown_history: list[AnswerId]
    fallback: str | None = Field(None, description="'popularity' when no history item was known")


class ModelInfo(BaseModel):
    model_version: str
    model_uri: str
    loaded_at: str
    catalog_size: int
    config: dict
    lineage: dict | None = Field(None, description="the training run: configuration, data set, code, versions, seeds")
    last_reload_error: str | None


class ServeArgs(BaseModel):
    """Typed arguments of the application builder (``serve run ray_rec.serve.app:build_app model_uri=...``)."""

    model_config = ConfigDict(extra="forbid")
    model_uri: str
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    batching: bool = True
    max_history: int = Field(1000, ge=1, le=MAX_LIST)
    max_candidates: int = Field(1000, ge=1, le=MAX_LIST)
    max_k: int = Field(1000, ge=1, le=MAX_LIST)
    max_model_mb: float | None = Field(None, gt=0, description="refuse (at start and on reload) a model larger than this; "
                                                               "default: load_model's (4096)")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    api_key_env: str = Field("", description="environment variable holding the API key; empty = no key")
    num_replicas: int | str = 1
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 32
    num_cpus: float = 1.0
