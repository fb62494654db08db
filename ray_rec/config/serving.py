"""The Serve application's settings: `ServeConfig` (its arguments) and `StateConfig` (the per-user
event store). Pydantic models: unknown keys and wrong types are refused, naming the field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_rec.config.sections import DEVICE_NAMES

MAX_REQUEST_LIST = 10_000  # the HTTP API's ceiling on any list in a request (`ray_rec.serve.schemas`)


STATE_BACKENDS = ("memory", "redis")
REDIS_URL_ENV = "RAY_REC_REDIS_URL"  # the default variables the Redis URL and password are read from
REDIS_PASSWORD_ENV = "RAY_REC_REDIS_PASSWORD"


class StateConfig(BaseModel):
    """Where a Serve deployment keeps each user's recent clicks and browses (``state:`` in the
    application's ``args``). The Redis URL and password are read from environment variables (a
    Secret), never from this config: it is logged and shown by Ray's dashboard."""

    model_config = ConfigDict(extra="forbid")
    backend: str = Field("memory", pattern=f"^({'|'.join(STATE_BACKENDS)})$",
                         description="memory: in the replica's own process (one replica, lost on restart); "
                                     "redis: shared by every replica, durable as the Redis server is configured")
    url_env: str = Field(REDIS_URL_ENV, description="redis: the environment variable holding the URL "
                                                    "(redis://host:6379/0, rediss:// for TLS)")
    password_env: str = Field(REDIS_PASSWORD_ENV, description="redis: the environment variable holding the password "
                                                              "(unset: none, or the one in the URL)")
    max_events: int = Field(100, ge=1, le=MAX_REQUEST_LIST,
                            description="clicks (and, apart, browses) kept per user, newest kept; recommend excludes "
                                        "every kept click and the model reads its last history_len")
    ttl_s: int | None = Field(None, ge=1, description="forget a user this many seconds after their last event "
                                                     "(unset: never)")
    timeout_s: float = Field(1.0, gt=0, le=60, description="redis: longest wait for an answer; past it a request "
                                                          "by user id gets 503")
    key_prefix: str = Field("ray_rec:user:", max_length=100, description="redis: the prefix of every key written")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("url", "password"):
                if key in values:
                    raise ValueError(f"state.{key} does not belong in a config (configs are logged): put it in "
                                     f"the environment variable that state.{key}_env names")
        return values


class ServeConfig(BaseModel):
    """The Serve application's arguments (``serve run ray_rec.serve.app:build_app model_uri=...``,
    a serve config's ``args``); unknown keys and wrong types are refused."""

    model_config = ConfigDict(extra="forbid")
    model_uri: str = Field(..., description="model artifact folder (local path or s3://)")
    max_batch_size: int = Field(32, ge=1, description="requests batched into one model call")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10, description="how long a batch waits to fill")
    batching: bool = Field(True, description="batch concurrent requests into one model call")
    max_history: int = Field(1000, ge=1, le=MAX_REQUEST_LIST, description="longest history a request may send")
    max_candidates: int = Field(1000, ge=1, le=MAX_REQUEST_LIST, description="most candidates a score request may send")
    max_k: int = Field(1000, ge=1, le=MAX_REQUEST_LIST, description="largest k a recommend request may ask")
    max_model_mb: float | None = Field(None, gt=0, description="refuse (at start and on reload) a model larger than this; "
                                                               "default: load_model's (4096)")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413 unread")
    api_key_env: str = Field("", description="environment variable holding the API key; empty = no key")
    device: str = Field("auto", pattern=f"^({DEVICE_NAMES})$",
                        description="where a replica scores: auto (the GPU its ray_actor_options.num_gpus gives it, "
                                    "else the CPU), cpu, cuda or cuda:N")
    state: StateConfig = Field(default_factory=StateConfig,
                               description="the per-user event store that requests by user_id read")
