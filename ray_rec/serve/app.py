"""The Ray Serve application: a FastAPI ingress whose requests are batched into one model call.

``build_app`` is the ``import_path`` target for ``serve run`` / ``serve deploy``; the model URI
can be changed at run time through ``user_config`` (hot reload, the old model keeps serving if
the new artifact is bad).
"""


import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve import Application

from ray_rec.device import device_name
from ray_rec.predict import Answer, Query, Recommender, load_model
from ray_rec.predict.explain import clicks_asked
from ray_rec.serve import http as replica_http
from ray_rec.serve.http import BodyLimit, RequireKey, validation_error
from ray_rec.serve.schemas import (
    MAX_ID_CHARS,
    EventsRequest,
    EventsResponse,
    Forgotten,
    ModelInfo,
    RecommendRequest,
    RecommendResponse,
    ScoreRequest,
    ScoreResponse,
    ServeArgs,
    UserState,
)
from ray_rec.serve.state import Event, StateUnavailable, UserStore, event_time, open_store

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
BATCH = ServeArgs.model_fields

api = FastAPI(
    title="ray_rec",
    description="Scores candidates and recommends items from a user's click history.",
    version="1",
)
api.add_middleware(BodyLimit)
api.add_middleware(RequireKey)  # added last, runs first: no body is read without the key
api.add_exception_handler(RequestValidationError, validation_error)


@dataclass
class Ask:
    """A score or recommend request as a batch takes it: ``fields`` of its `Query` beyond the history."""

    body: ScoreRequest | RecommendRequest
    rec: Recommender
    fields: dict[str, Any]


@dataclass
class Reply:
    """A request's answer, the raw history it was answered from, its unknown ids and the
    ``stored_clicks`` part of the response."""

    history: list[Any]
    unknown: list[Any]
    read: dict[str, Any]
    answer: Answer


@serve.deployment
@serve.ingress(api)
class RecommenderService:
    """One replica: holds a loaded model and serves the HTTP API."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ServeArgs(**args)
        self.api_key = replica_http.api_key_from_env(self.args.api_key_env)
        if self.api_key is None:
            logger.info("no API key (api_key_env): every client that reaches this endpoint is served")
        self.rec: Recommender = load_model(self.args.model_uri, self.args.max_model_mb, self.args.device)
        self.reload_error: str | None = None
        self._batched.set_max_batch_size(self.args.max_batch_size)  # type: ignore[attr-defined]
        self._batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)  # type: ignore[attr-defined]
        state = self.args.state
        self.store: UserStore = open_store(state)
        if state.backend == "memory":
            logger.info("user state in this replica's memory: events sent to another replica are not seen here "
                        "and all are lost when it stops (state.backend: redis shares them)")
        if state.max_events < self.rec.config.history_len:
            logger.warning("state.max_events=%d keeps fewer clicks than the model reads (%d)", state.max_events,
                           self.rec.config.history_len)
        replica_http.REPLICA.service = self  # through the module: Serve ships this class by value
        torch.set_num_threads(1)
        logger.info("serving model %s from %s on %s", self.rec.version, self.args.model_uri, device_name(self.rec.device))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot reload: ``user_config: {model_uri: ...}`` swaps the model if the new one loads and
        passes `load_model`'s checks (size budget, shapes, hash, finite weights, a trial prediction)."""
        uri = (user_config or {}).get("model_uri")
        if not uri or uri == self.rec.uri:
            return
        try:
            if not isinstance(uri, str):
                raise ValueError(f"user_config.model_uri must be a string, got {type(uri).__name__}")
            new = load_model(uri, self.args.max_model_mb, self.args.device)
        except Exception as exc:  # any failure keeps the old model serving
            self.reload_error = f"{uri}: {exc}"
            logger.error("model reload rejected, still serving %s: %s", self.rec.version, self.reload_error)
            return
        self.rec, self.reload_error = new, None
        logger.info("model reloaded: now serving %s from %s", new.version, uri)

    def _check(self, body: ScoreRequest | RecommendRequest) -> int:
        """What every score or recommend request must meet before it is batched; returns the clicks to
        name per answer (0 without ``explain``)."""
        if len(body.history) > self.args.max_history:
            raise HTTPException(422, f"history has {len(body.history)} items; the limit is {self.args.max_history}")
        if body.user_id is None and not body.history:
            raise HTTPException(422, "history is empty: send at least one clicked item id, or a user_id")
        try:
            return clicks_asked(body.explain, body.explain_top)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @api.post("/v1/score", response_model=ScoreResponse)
    async def score(self, body: ScoreRequest) -> dict[str, Any]:
        """Relevance of each candidate to the history, in order (null for unknown candidates)."""
        top = self._check(body)
        if not body.candidates:
            raise HTTPException(422, "candidates is empty")
        if len(body.candidates) > self.args.max_candidates:
            raise HTTPException(422, f"{len(body.candidates)} candidates; the limit is {self.args.max_candidates}")
        rec = self.rec
        idx = [rec.vocab.index_of(c) or 0 for c in body.candidates]
        reply = await self._answer(Ask(body, rec, {"candidates": idx, "explain": top}))
        answer = reply.answer
        return {
            **reply.read,
            "model_version": rec.version,
            "scores": answer.scores,
            "because": [[r._asdict() for r in row] for row in rec.raw_reasons(answer, reply.history)] if top else None,
            "unknown_history": reply.unknown,
            "unknown_candidates": [c for c, i in zip(body.candidates, idx) if not i],
            "fallback": answer.fallback,
        }

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> dict[str, Any]:
        """The top-k items of the catalog for the history."""
        top = self._check(body)
        if not 1 <= body.k <= self.args.max_k:
            raise HTTPException(422, f"k={body.k} must be between 1 and {self.args.max_k}")
        rec = self.rec
        reply = await self._answer(Ask(body, rec, {"k": body.k, "exclude": body.exclude_history, "explain": top}))
        answer = reply.answer
        items: list[dict[str, Any]] = [{"item_id": rec.vocab.raw_id(i), "score": s} for i, s in zip(answer.items or [], answer.scores)]
        if top:
            for item, why in zip(items, rec.raw_reasons(answer, reply.history)):
                item["because"] = [r._asdict() for r in why]
        return {**reply.read, "model_version": rec.version, "items": items, "unknown_history": reply.unknown,
                "fallback": answer.fallback}

    @api.post("/v1/events", response_model=EventsResponse)
    async def events(self, body: EventsRequest) -> dict[str, Any]:
        """Store a batch of user events, all or none; 503 when the store cannot take them (nothing
        of the batch is stored then: send it again)."""
        now = time.time()
        events = [Event(str(e.user_id), e.item_id, event_time(e.timestamp, now), e.event) for e in body.events]
        await self._state(self.store.append(events), "nothing was stored, send the events again")
        known = self.rec.vocab.indices([e.item_id for e in events])
        return {"stored": len(events), "users": len({e.user_id for e in events}),
                "unknown_items": sum(i is None for i in known)}

    @api.get("/v1/users/{user_id}", response_model=UserState)
    async def user(self, user_id: str) -> dict[str, Any]:
        """A user's stored clicks and browses (empty lists for a user with none)."""
        self._check_user(user_id)
        stored = await self._state(self.store.history(user_id), "retry")
        return {"user_id": user_id, **{kind: [{"item_id": item, "timestamp": t} for item, t in pairs]
                                       for kind, pairs in (("clicks", stored.clicks), ("browses", stored.browses))}}

    @api.delete("/v1/users/{user_id}", response_model=Forgotten)
    async def forget(self, user_id: str) -> dict[str, Any]:
        """Erase everything stored for a user (the right to be forgotten)."""
        self._check_user(user_id)
        erased = await self._state(self.store.forget(user_id), "nothing was erased, retry")
        return {"user_id": user_id, "erased": erased}

    @staticmethod
    async def _state(call: Awaitable[T], then: str) -> T:
        """``call``'s result; 503 saying ``then`` (what the client should do) when the store cannot answer."""
        try:
            return await call
        except StateUnavailable as exc:
            logger.warning("%s", exc)
            raise HTTPException(503, f"the user state store is unavailable: {then}") from None

    @staticmethod
    def _check_user(user_id: str) -> None:
        if not user_id or len(user_id) > MAX_ID_CHARS:
            raise HTTPException(422, f"a user id is 1 to {MAX_ID_CHARS} characters")

    @api.get("/v1/model", response_model=ModelInfo)
    async def model_info(self) -> dict[str, Any]:
        """Which model is serving, since when, and its configuration."""
        rec = self.rec
        return {
            "model_version": rec.version,
            "model_uri": rec.uri,
            "loaded_at": rec.loaded_at,
            "catalog_size": len(rec.vocab),
            "config": rec.meta["model"],
            "lineage": rec.meta.get("lineage"),
            "last_reload_error": self.reload_error,
        }

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness; needs no API key."""
        return {"status": "ok", "model_version": self.rec.version}

    async def _answer(self, ask: Ask) -> Reply:
        reply = await self._batched(ask) if self.args.batching else (await self._answer_all([ask]))[0]
        if isinstance(reply, HTTPException):
            raise reply
        return reply

    @serve.batch(max_batch_size=BATCH["max_batch_size"].default,  # both reset from ServeArgs in __init__
                 batch_wait_timeout_s=BATCH["batch_wait_timeout_s"].default)
    async def _batched(self, asks: list[Ask]) -> list[Reply | HTTPException]:
        return await self._answer_all(asks)

    async def _answer_all(self, asks: list[Ask]) -> list[Reply | HTTPException]:
        """A batch of requests: the stored clicks of all its users in one store round trip, then one
        `Recommender.predict` per model (models only differ across a hot reload). A request that
        cannot be answered gets its HTTP error in its place."""
        users = [str(a.body.user_id) for a in asks if a.body.user_id is not None]
        stored: dict[str, list[tuple[Any, float]]] | None = {}
        if users:
            try:
                stored = dict(zip(users, await self.store.clicks(users)))
            except StateUnavailable as exc:
                logger.warning("%s", exc)
                stored = None
        out: list[Any] = [None] * len(asks)  # a Reply or an HTTPException in each place
        queries: dict[int, list[tuple[int, Query, tuple[list[Any], list[Any], dict[str, Any]]]]] = {}
        for pos, ask in enumerate(asks):
            try:
                raw, stamps, read = self._history(ask.body, stored)
                known, unknown, buckets = ask.rec.lookup(raw, stamps)
            except ValueError as exc:  # the click times do not fit the history
                out[pos] = HTTPException(422, str(exc))
                continue
            except HTTPException as exc:
                out[pos] = exc
                continue
            queries.setdefault(id(ask.rec), []).append((pos, Query(known, time_buckets=buckets, **ask.fields), (raw, unknown, read)))
        for group in queries.values():
            rec = asks[group[0][0]].rec
            for (pos, _, parts), answer in zip(group, rec.predict([q for _, q, _ in group])):
                out[pos] = Reply(*parts, answer)
        return out

    def _history(self, body: ScoreRequest | RecommendRequest, stored: dict[str, list[tuple[Any, float]]] | None,
                 ) -> tuple[list[Any], list[float] | None, dict[str, Any]]:
        """The history a request is answered from, its click times, and the answer's ``stored_clicks``:
        the user's stored clicks (``stored``; None: the store did not answer) followed by the
        request's own items. The stored times are kept when the request's items come with times,
        or with no items. Store down: a request that carries a history is answered from it; one by
        id alone gets 503. A user with no stored clicks and no history gets the popularity answer."""
        if body.user_id is None:
            return list(body.history), body.timestamps, {}
        if stored is None:
            if not body.history:
                raise HTTPException(503, "the user state store is unavailable: retry, or send the history")
            return list(body.history), body.timestamps, {"stored_clicks": None}
        clicks = stored[str(body.user_id)]
        room = self.args.max_history - len(body.history)  # the stored clicks past it are the oldest
        clicks = clicks[len(clicks) - room:] if len(clicks) > room else clicks
        items = [item for item, _ in clicks] + list(body.history)
        if body.history and body.timestamps is None:
            return items, None, {"stored_clicks": len(clicks)}
        return items, [t for _, t in clicks] + list(body.timestamps or []), {"stored_clicks": len(clicks)}


def deployment_options(args: ServeArgs, num_gpus: float = 0) -> dict[str, Any]:
    """Serve deployment options from the builder's arguments: one replica of one CPU (and
    ``num_gpus``). Replicas, autoscaling and actor resources are Serve's own settings: a serve
    config's ``deployments:`` section (serve_configs/production.yaml) overrides these, or
    ``build_app(...).options(...)``."""
    return {
        # A batch can never be larger than the requests a replica accepts (ray#43288).
        "max_ongoing_requests": max(4 * args.max_batch_size, 64),
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 1, **({"num_gpus": num_gpus} if num_gpus else {})},
        "user_config": {"model_uri": args.model_uri},
    }


def application(args: ServeArgs, num_gpus: float = 0) -> Application:
    """The app with each replica holding ``num_gpus`` (``ray-rec serve --gpu``; a serve config sets
    its own in ``ray_actor_options``)."""
    return RecommenderService.options(**deployment_options(args, num_gpus)).bind(args.model_dump())  # type: ignore[attr-defined]


def build_app(args: ServeArgs) -> Application:
    """Application builder: ``serve run ray_rec.serve.app:build_app model_uri=s3://.../model``.
    (Serve calls a builder with exactly one argument.)"""
    return application(args)
