"""Request and response bodies of the HTTP API (they make the published OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Literal

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
UserId = StrictInt | Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
USER_ID_HELP = ("a user whose events were sent to /v1/events: their stored clicks are the history, "
                "followed by this request's `history` items for this request only")
HISTORY_HELP = "clicked item ids, oldest first (raw ids); may be left out when user_id is given"
TIMES_HELP = ("optional click time of each `history` item (epoch seconds or milliseconds), oldest first; "
              "with user_id, the stored clicks' times are read only when these are sent (or history is empty)")


class ScoreRequest(BaseModel):
    """Score given candidates for one user."""

    model_config = ConfigDict(extra="forbid")
    user_id: UserId | None = Field(None, description=USER_ID_HELP)
    history: Ids = Field(default_factory=list, description=HISTORY_HELP)
    candidates: Ids = Field(..., description="item ids to score, in the order to return")
    timestamps: Times | None = Field(None, description=TIMES_HELP)
    explain: bool = Field(False, description="also name the history clicks that raised each answer's score most")
    explain_top: StrictInt = Field(3, description="with explain: how many clicks to name per answer (1-20)")


class RecommendRequest(BaseModel):
    """Top-k of the whole catalog for one user."""

    model_config = ConfigDict(extra="forbid")
    user_id: UserId | None = Field(None, description=USER_ID_HELP)
    history: Ids = Field(default_factory=list, description=HISTORY_HELP)
    k: StrictInt = Field(10, description="how many items to return")
    exclude_history: bool = Field(True, description="never recommend an item of the history")
    timestamps: Times | None = Field(None, description=TIMES_HELP)
    explain: bool = Field(False, description="also name the history clicks that raised each answer's score most")
    explain_top: StrictInt = Field(3, description="with explain: how many clicks to name per answer (1-20)")


class Because(BaseModel):
    """A history click that moved an item's score."""

    item_id: AnswerId
    position: int = Field(..., description="its index in the history read (0 = oldest): the stored clicks, "
                                           "then the request's")
    share: float = Field(..., description="its signed share of the clicks' total absolute contribution to the score")


class ScoreResponse(BaseModel):
    model_version: str
    stored_clicks: int | None = Field(None, description="with user_id: the stored clicks read (null: the store "
                                                         "was unavailable and the request's history alone answered)")
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
    stored_clicks: int | None = Field(None, description="with user_id: the stored clicks read (null: the store "
                                                         "was unavailable and the request's history alone answered)")
    items: list[RecommendedItem]
    unknown_history: list[AnswerId]
    fallback: str | None = Field(None, description="'popularity' when no history item was known")


class UserEvent(BaseModel):
    """One event of a user."""

    model_config = ConfigDict(extra="forbid")
    user_id: UserId
    item_id: ItemId = Field(..., description="an item id the model does not know is stored and counted as unknown")
    timestamp: float | None = Field(None, ge=0, allow_inf_nan=False,
                                    description="epoch seconds or milliseconds (unset: when the event arrived)")
    event: Literal["click", "browse"] = "click"  # the store's kinds (`ray_rec.serve.state.KINDS`)


class EventsRequest(BaseModel):
    """A batch of events, stored all or none."""

    model_config = ConfigDict(extra="forbid")
    events: Annotated[list[UserEvent], Field(min_length=1, max_length=MAX_LIST)]


class EventsResponse(BaseModel):
    stored: int = Field(..., description="events stored (every event of the request)")
    users: int
    unknown_items: int = Field(..., description="of them, events on items the serving model does not know")


class StoredEvent(BaseModel):
    item_id: AnswerId
    timestamp: float = Field(..., description="epoch seconds")


class UserState(BaseModel):
    user_id: str
    clicks: list[StoredEvent] = Field(..., description="oldest first")
    browses: list[StoredEvent] = Field(..., description="oldest first")


class Forgotten(BaseModel):
    user_id: str
    erased: bool = Field(..., description="whether anything was stored for the user")


class ModelInfo(BaseModel):
    model_version: str
    model_uri: str
    loaded_at: str
    catalog_size: int
    config: dict
    lineage: dict | None = Field(None, description="the training run: configuration, data set, code, versions, seeds")
    last_reload_error: str | None


ServeArgs = ServeConfig  # the application builder's arguments, defined with every other setting
