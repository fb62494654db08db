"""Request and response bodies of the HTTP API (they make the published OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints

from ray_rec.config import MAX_REQUEST_LIST, ServeConfig

# Hard ceilings of every request list and id, checked while the body is parsed: a list past its
# ceiling fails at once with one error, instead of one error per element (each echoing its input).
# The replica's own limits (`ServeArgs.max_history`, ...) are lower and configurable.
MAX_LIST = MAX_REQUEST_LIST
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
    explain: bool = Field(False, description="also name the history clicks that raised each answer's score most")
    explain_top: StrictInt = Field(3, description="with explain: how many clicks to name per answer (1-20)")


class RecommendRequest(BaseModel):
    """Top-k of the whole catalog for one user."""

    model_config = ConfigDict(extra="forbid")
    history: Ids = Field(..., description="clicked item ids, oldest first (raw ids)")
    k: StrictInt = Field(10, description="how many items to return")
    exclude_history: bool = Field(True, description="never recommend an item of the history")
    timestamps: Times | None = Field(
        None, description="optional click time of each history item (epoch seconds or milliseconds), oldest first"
    )
    explain: bool = Field(False, description="also name the history clicks that raised each answer's score most")
    explain_top: StrictInt = Field(3, description="with explain: how many clicks to name per answer (1-20)")


class Because(BaseModel):
    """A history click that moved an item's score."""

    item_id: AnswerId
    position: int = Field(..., description="its index in the request's history (0 = oldest)")
    share: float = Field(..., description="its signed share of the clicks' total absolute contribution to the score")


class ScoreResponse(BaseModel):
    model_version: str
    scores: list[float | None] = Field(..., description="relevance per candidate, in order; null = unknown item")
    because: list[list[Because]] | None = Field(
        None, description="with explain: per candidate, the clicks that raised its score most (empty for an unknown one)"
    )
    unknown_history: list[AnswerId]
    unknown_candidates: list[AnswerId]
    fallback: str | None = Field(
        None, description="'popularity' when no history item was known: scores are training click counts"
    )


class RecommendedItem(BaseModel):
    item_id: AnswerId
    score: float
    because: list[Because] | None = Field(None, description="with explain: the clicks that raised its score most")


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


ServeArgs = ServeConfig  # the application builder's arguments, defined with every other setting
