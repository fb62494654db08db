"""`ray-rec demo`: the whole product end to end on synthetic data, on this machine.

Synthetic click-and-browse logs (users' interests drift, see `ray_rec.data.synthetic`) go into a
loopback S3-protocol server (moto) or a local folder, then prepare -> train (2 Ray Train
workers) -> evaluate -> a Ray Serve endpoint -> real HTTP requests -> shutdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ray_rec.data.synthetic import SyntheticSpec, generate

BUCKET = "ray-rec-demo"


@dataclass
class DemoOptions:
    workdir: str | None = None
    users: int = 3000
    epochs: int = 20
    use_s3: bool = True


def _step(n: int, text: str) -> None:
    print(f"\n== [{n}/6] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with throwaway credentials, set in the environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _post(url: str, body: dict) -> dict:
    """POST ``body`` as a client of the service should (`ray_rec.serve.client`); the answer's JSON."""
    from ray_rec.serve.client import retrying_session

    with retrying_session() as session:
        answer = session.post(url, json=body, timeout=30)
    answer.raise_for_status()
    return answer.json()


def run_demo(opts: DemoOptions) -> int:
    started = time.monotonic()
    workdir = opts.workdir or tempfile.mkdtemp(prefix="ray-rec-demo-")
    os.makedirs(workdir, exist_ok=True)
    use_s3 = opts.use_s3
    if use_s3:
        try:
            import moto  # noqa: F401
        except ImportError:
            print("moto is not installed (pip install 'ray-rec[demo]'): using a local folder instead of S3")
            use_s3 = False
    with loopback_s3() if use_s3 else contextlib.nullcontext() as endpoint:
        root = f"s3://{BUCKET}" if use_s3 else workdir
        print(f"storage: {root}" + (f" (loopback S3 server at {endpoint})" if use_s3 else ""))
        code = _run(opts, workdir, root)
    if opts.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    return code


def _run(opts: DemoOptions, workdir: str, root: str) -> int:
    from ray_rec import storage
    from ray_rec.config import load_config
    from ray_rec.data.prepare import PrepareOptions, prepare

    _step(1, f"generating synthetic click-and-browse logs for {opts.users:,} users (interests drift over time)")
    log, catalog = generate(SyntheticSpec(users=opts.users, items=max(200, opts.users // 6), topics=25))
    raw = os.path.join(workdir, "raw")
    os.makedirs(raw, exist_ok=True)
    pq.write_table(log, os.path.join(raw, "events.parquet"))
    pacsv.write_csv(catalog, os.path.join(raw, "items.csv"))
    storage.copy_dir(raw, storage.join(root, "raw"))
    print(f"{log.num_rows:,} events -> {storage.join(root, 'raw')}")

    _step(2, "ray-rec prepare: events -> sharded sequences")
    data = storage.join(root, "data")
    manifest = prepare(PrepareOptions(input=storage.join(root, "raw", "events.parquet"), output=data,
                                      items=storage.join(root, "raw", "items.csv"), num_shards=4),
                       progress=lambda m: print(f"  {m}", flush=True))
    c = dataclasses.asdict(manifest.counts)
    print(f"{c['users']:,} users, {c['items']:,} items, {c['events']:,} events ({c['clicks']:,} clicks) -> {data}")

    _step(3, f"ray-rec train: 2 Ray Train workers, up to {opts.epochs} epochs")
    from ray_rec.ray_session import init_ray
    from ray_rec.train.trainer import train

    init_ray(2, serving=True)  # step 5 serves from this Ray
    config = load_config(None, {"model.dim": 32, "train.epochs": opts.epochs, "train.patience": 3})
    result = train(data, storage.join(root, "run"), config, workers=2)
    print(f"best epoch {result.best_epoch}/{result.epochs_run}; artifact: {result.model_uri}"
          f"{' (the final fit: trained again on every click)' if result.final_fit else ''} ({result.seconds:.0f} s)")

    _step(4, "ray-rec evaluate: the split run's model on the test split, full catalog ranking")
    from ray_rec.predict.evaluate import evaluate_model, format_table

    metrics = evaluate_model(data, result.split_model_uri or result.model_uri, split="test")
    print(format_table(metrics))
    model_ndcg, pop_ndcg = metrics["full_ranking"]["NDCG@10"], metrics["popularity_full_ranking"]["NDCG@10"]
    print(f"NDCG@10: model {model_ndcg:.4f} vs popularity {pop_ndcg:.4f} ({model_ndcg / max(pop_ndcg, 1e-9):.1f}x)")

    _step(5, "ray-rec serve: a Ray Serve HTTP endpoint, and a few real requests")
    from ray import serve

    from ray_rec.serve.local import start

    url = start(result.model_uri, port=_free_port())
    try:
        users = generate(SyntheticSpec(users=3, items=max(200, opts.users // 6), topics=25, seed=99))[0]
        clicks = [r["item_id"] for r in users.to_pylist() if r["event"] == "click" and r["user_id"] == "u0"][-8:]
        print(f"POST {url}/v1/recommend  history={clicks}  explain=true")
        rec = _post(url + "/v1/recommend", {"history": clicks, "k": 5, "explain": True, "explain_top": 2})
        for item in rec["items"]:
            because = ", ".join(f"{b['item_id']} ({b['share']:+.0%})" for b in item["because"])
            print(f"  {item['item_id']:>8}  score {item['score']:.3f}  because of {because}")
        cands = [i["item_id"] for i in rec["items"][:2]] + ["i1", "i2"]
        print(f"POST {url}/v1/score  candidates={cands}")
        print("  " + json.dumps(_post(url + "/v1/score", {"history": clicks, "candidates": cands})["scores"]))
        # By user id: the service keeps the user's clicks (in the replica's memory here; Redis in production).
        # Each with its time, so a resent batch (`_post`) is stored once.
        now = int(time.time())
        events = [{"user_id": "demo-user", "item_id": item, "event": "click", "timestamp": now - len(clicks) + i}
                  for i, item in enumerate(clicks)]
        print(f"POST {url}/v1/events  {len(events)} clicks of user demo-user")
        print("  " + json.dumps(_post(url + "/v1/events", {"events": events})))
        by_id = _post(url + "/v1/recommend", {"user_id": "demo-user", "k": 5})
        print(f"POST {url}/v1/recommend  user_id=demo-user  ->  {[i['item_id'] for i in by_id['items']]} "
              f"(from {by_id['stored_clicks']} stored clicks)")
    finally:
        _step(6, "shutting down Serve and Ray")
        serve.shutdown()
        import ray

        ray.shutdown()
    print(
        "\nNext steps:\n"
        "  your own data:  ray-rec prepare --input s3://bucket/logs/ --format events --output s3://bucket/ds\n"
        "                  ray-rec train --data s3://bucket/ds --output s3://bucket/runs/r1 --workers 2\n"
        "                  ray-rec evaluate --data s3://bucket/ds --model s3://bucket/runs/r1/split_model\n"
        "                  ray-rec serve --model s3://bucket/runs/r1/model\n"
        "  a cluster:      README.md, 'Running on a cluster' (ray up cluster.yaml; ray job submit ...)"
    )
    return 0 if model_ndcg > pop_ndcg else 1


if __name__ == "__main__":
    sys.exit(run_demo(DemoOptions()))
