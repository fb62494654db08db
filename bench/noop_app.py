"""A no-op Serve app with the same ingress, batching and deployment settings as the real one:
the ceiling Serve itself sets on this machine, for the load benchmark."""

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

noop_api = FastAPI(title="ray_rec no-op")


@serve.deployment
@serve.ingress(noop_api)
class NoopService:
    """Answers /v1/recommend through ``@serve.batch`` without a model."""

    def __init__(self, max_batch_size: int, wait_s: float) -> None:
        self._batched.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self._batched.set_batch_wait_timeout_s(wait_s)  # type: ignore[attr-defined]

    @noop_api.post("/v1/recommend")
    async def recommend(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._batched(body)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"model_version": "noop", "items": []} for _ in bodies]


def build_noop_app(max_batch_size: int = 32, wait_s: float = 0.005) -> Application:
    return NoopService.options(  # type: ignore[attr-defined]
        max_ongoing_requests=max(4 * max_batch_size, 64), ray_actor_options={"num_cpus": 1}
    ).bind(max_batch_size, wait_s)
