"""`ray-rec serve`: the Serve app on a local Ray, in the foreground until Ctrl-C."""

from __future__ import annotations

import ipaddress
import logging
import time

from ray import serve

from ray_rec.config import StateConfig
from ray_rec.ray_session import REQUEST_TIMEOUT_S, init_ray
from ray_rec.serve.app import application
from ray_rec.serve.schemas import ServeArgs

logger = logging.getLogger(__name__)

APP_NAME = "ray_rec"


def start(model_uri: str, host: str = "127.0.0.1", port: int = 8000, request_timeout_s: float = REQUEST_TIMEOUT_S,
          num_gpus: float = 0, **args: object) -> str:
    """Deploy the app on the current Ray and return its base URL. A request that gets no answer
    within ``request_timeout_s`` (a replica died mid-request, say) is answered with an error
    rather than left hanging. ``num_gpus``: the replica's GPUs (it then scores on its GPU)."""
    warn_if_open(host, port, str(args.get("api_key_env") or ""))
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    serve.run(application(ServeArgs(model_uri=model_uri, **args), num_gpus), name=APP_NAME, route_prefix="/")  # type: ignore[arg-type]
    return f"http://{host}:{port}"


def check_redis(config: StateConfig) -> None:
    """Fail before Ray starts when the Redis ``config`` names is not configured or does not answer.

    Raises:
        ValueError: the URL variable is unset.
        ConnectionError: Redis did not answer, or refused the password."""
    from ray_rec.serve.state import connect, redis_url

    connect(*redis_url(config)).close()


def warn_if_open(host: str, port: int, api_key_env: str) -> bool:
    """Log a warning (and return True) when the endpoint listens beyond loopback without a key."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback or api_key_env:
        return False
    logger.warning("serving on %s:%d without an API key: anyone who reaches it can query the model "
                   "(set --api-key-env)", host, port)
    return True


def serve_foreground(model_uri: str, host: str, port: int, max_batch_size: int, api_key_env: str, gpu: bool = False,
                     state: str = "memory") -> None:
    from ray_rec.device import resolve_device
    from ray_rec.predict import load_model

    if gpu:
        resolve_device("cuda")  # no GPU here: a clear error before Ray starts
    load_model(model_uri, device="cpu")  # a bad artifact fails here, with a clear message, before Ray starts
    if state == "redis":
        check_redis(StateConfig(backend="redis"))
    init_ray(1, serving=True)
    url = start(model_uri, host, port, num_gpus=1 if gpu else 0, max_batch_size=max_batch_size, api_key_env=api_key_env,
                device="cuda" if gpu else "cpu", state={"backend": state})
    print(f"serving {model_uri} at {url} (OpenAPI docs at {url}/docs); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
