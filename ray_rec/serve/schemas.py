"""Request and response bodies of the HTTP API (they make the published OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

ItemId = StrictInt | StrictStr


class ScoreRequest(BaseModel):
    """Score given candidates for one user."""

    model_config = ConfigDict(extra="forbid")
    history: list[ItemId] = Field(..., description="clicked item ids, oldest first (raw ids)")
    candidates: list[ItemId] = Field(..., description="item ids to score, in the order to return")
    timestamps: list[float] | None = Field(
        None, description="optional click time of each history item (epoch seconds or milliseconds), oldest first"
    )


class RecommendRequest(BaseModel):
    """Top-k of the whole catalog for one user."""

    model_config = ConfigDict(extra="forbid")
    history: list[ItemId] = Field(..., description="clicked item ids, oldest first (raw ids)")
    k: StrictInt = Field(10, description="how many items to return")
    exclude_history: bool = Field(True, description="never recommend an item of the history")
    timestamps: list[float] | None = Field(
        None, description="optional click time of each history item (epoch seconds or milliseconds), oldest first"
    )


class ScoreResponse(BaseModel):
    model_version: str
    scores: list[float | None] = Field(..., description="relevance per candidate, in order; null = unknown item")
    unknown_history: list[ItemId]
    unknown_candidates: list[ItemId]
    fallback: str | None = Field(
        None, description="'popularity' when no history item was known: scores are training click counts"
    )


class RecommendedItem(BaseModel):
    item_id: ItemId
    score: float


class RecommendResponse(BaseModel):
    model_version: str
    items: list[RecommendedItem]
    unknown_history: list[ItemId]
    fallback: str | None = Field(None, description="'popularity' when no history item was known")


class ModelInfo(BaseModel):
    model_version: str
    model_uri: str
    loaded_at: str
    catalog_size: int
    config: dict
    last_reload_error: str | None


class ServeArgs(BaseModel):
    """Typed arguments of the application builder (``serve run ray_rec.serve.app:build_app model_uri=...``)."""

    model_uri: str
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10)
    batching: bool = True
    max_history: int = Field(1000, ge=1)
    max_candidates: int = Field(1000, ge=1)
    max_k: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    api_key_env: str = Field("", description="environment variable holding the API key; empty = no key")
    num_replicas: int | str = 1
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 32
    num_cpus: float = 1.0
