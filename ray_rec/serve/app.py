"""The Ray Serve application: a FastAPI ingress whose requests are batched into one model call.

``build_app`` is the ``import_path`` target for ``serve run`` / ``serve deploy``; the model URI
can be changed at run time through ``user_config`` (hot reload, the old model keeps serving if
the new artifact is bad).
"""


import logging
from typing import Any

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
    ModelInfo,
    RecommendRequest,
    RecommendResponse,
    ScoreRequest,
    ScoreResponse,
    ServeArgs,
)

logger = logging.getLogger("ray.serve")
BATCH = ServeArgs.model_fields

api = FastAPI(
    title="ray_rec",
    description="Scores candidates and recommends items from a user's click history.",
    version="1",
)
api.add_middleware(BodyLimit)
api.add_middleware(RequireKey)  # added last, runs first: no body is read without the key
api.add_exception_handler(RequestValidationError, validation_error)


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

    def _history(self, raw: list[Any], stamps: list[float] | None) -> tuple[list[int], list[Any], list[int] | None]:
        """Known item indices, unknown ids, and the known items' time buckets (None without times)."""
        if not raw:
            raise HTTPException(422, "history is empty: send at least one clicked item id")
        if len(raw) > self.args.max_history:
            raise HTTPException(422, f"history has {len(raw)} items; the limit is {self.args.max_history}")
        try:
            return self.rec.lookup(raw, stamps)
        except ValueError as exc:  # the click times do not fit the history
            raise HTTPException(422, str(exc)) from None

    @staticmethod
    def _explain_top(explain: bool, top: int) -> int:
        """Clicks to name per answer (0 without ``explain``); a bad count is a 422."""
        try:
            return clicks_asked(explain, top)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @api.post("/v1/score", response_model=ScoreResponse)
    async def score(self, body: ScoreRequest) -> dict[str, Any]:
        """Relevance of each candidate to the history, in order (null for unknown candidates)."""
        history, unknown, times = self._history(body.history, body.timestamps)
        if not body.candidates:
            raise HTTPException(422, "candidates is empty")
        if len(body.candidates) > self.args.max_candidates:
            raise HTTPException(422, f"{len(body.candidates)} candidates; the limit is {self.args.max_candidates}")
        rec = self.rec
        idx = [rec.vocab.index_of(c) or 0 for c in body.candidates]
        top = self._explain_top(body.explain, body.explain_top)
        answer = await self._call(Query(history, candidates=idx, time_buckets=times, explain=top), rec)
        return {
            "model_version": rec.version,
            "scores": answer.scores,
            "because": [[r._asdict() for r in row] for row in rec.raw_reasons(answer, body.history)] if top else None,
            "unknown_history": unknown,
            "unknown_candidates": [c for c, i in zip(body.candidates, idx) if not i],
            "fallback": answer.fallback,
        }

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> dict[str, Any]:
        """The top-k items of the catalog for the history."""
        history, unknown, times = self._history(body.history, body.timestamps)
        if not 1 <= body.k <= self.args.max_k:
            raise HTTPException(422, f"k={body.k} must be between 1 and {self.args.max_k}")
        rec = self.rec
        top = self._explain_top(body.explain, body.explain_top)
        answer = await self._call(Query(history, k=body.k, exclude=body.exclude_history, time_buckets=times, explain=top), rec)
        items: list[dict[str, Any]] = [{"item_id": rec.vocab.raw_id(i), "score": s} for i, s in zip(answer.items or [], answer.scores)]
        if top:
            for item, why in zip(items, rec.raw_reasons(answer, body.history)):
                item["because"] = [r._asdict() for r in why]
        return {"model_version": rec.version, "items": items, "unknown_history": unknown, "fallback": answer.fallback}

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

    async def _call(self, query: Query, rec: Recommender) -> Answer:
        if self.args.batching and query.history:  # a popularity answer needs no batch
            return await self._batched((query, rec))
        return rec.predict([query])[0]

    @serve.batch(max_batch_size=BATCH["max_batch_size"].default,  # both reset from ServeArgs in __init__
                 batch_wait_timeout_s=BATCH["batch_wait_timeout_s"].default)
    async def _batched(self, items: list[tuple[Query, Recommender]]) -> list[Answer]:
        """One `Recommender.predict` for a whole batch of queries (grouped by model, which only
        differs across a hot reload)."""
        out: list[Any] = [None] * len(items)
        by_model: dict[int, list[int]] = {}
        for i, (_, rec) in enumerate(items):
            by_model.setdefault(id(rec), []).append(i)
        for positions in by_model.values():
            rec = items[positions[0]][1]
            for pos, result in zip(positions, rec.predict([items[p][0] for p in positions])):
                out[pos] = result
        return out


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
