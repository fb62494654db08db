"""The GPU check of training, ranking and serving (run by ``bench/gpu_check.sh`` on a GPU machine).

Parts, each a row of ``bench/results/gpu_check.json`` under the device it ran on (a CPU run of the
same command fills the baseline the GPU rows are compared with):

- ``speed``: training steps of the product's default model on Beauty, fp32 and bf16 alternating
  for three rounds: examples/s over the epochs after the first (median round), seconds an epoch.
- ``quality``: a full training run on the device (the model-quality benchmark's default row,
  seed 0), test NDCG@10 beside the CPU seeds' spread from ``model_quality_Beauty.json``.
- ``recommend``: `Recommender.recommend` (top 10, seen items excluded) over a catalog of
  ``--catalog`` random items, 1 and 32 histories a call, median seconds a call.
- ``pipeline`` (needs Ray): one epoch of the Ray Data training pipeline alone (read, examples,
  length buckets, collate) in examples/s, against the device's training examples/s.
- ``ray_train`` (needs Ray): ``ray-rec train`` (``--gpu`` on a GPU) for a few epochs: examples/s and
  the share of time spent waiting for data.
- ``serve`` (needs Ray): the Serve endpoint, the replica on the device, ``/v1/recommend`` at
  concurrency 32.

    python -m bench.gpu_check --device cuda          # on the GPU machine (bench/gpu_check.sh)
    python -m bench.gpu_check --device cpu           # the baseline, on this machine
    python -m bench.gpu_check --device cpu --quick   # a synthetic log, small sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.model_quality import MODEL, SCHEDULE, prepared
from bench.output import RESULTS, STORED, machine, write_json
from bench.train_speed import plain_loop_run
from ray_rec.config import for_data, load_config
from ray_rec.data.examples import browse_width
from ray_rec.data.manifest import read_manifest
from ray_rec.device import device_name, resolve_device
from ray_rec.model.interest_model import InterestModel

RESULT = "gpu_check.json"
PARTS = ("speed", "quality", "recommend", "pipeline", "ray_train", "serve")
# The model-quality row this check's quality run repeats (its overrides on top of MODEL and SCHEDULE).
QUALITY_ROW = "default with model.tracker_layers=1, train.lr_patience=3"
QUALITY_SET = {"model.tracker_layers": 1, "train.lr_patience": 3}


def speed(data: str, device: torch.device, precision: str, epochs: int) -> dict[str, Any]:
    """Examples/s of the training step (the product's default model, batch 128) over the epochs after the first."""
    run = plain_loop_run(data, {"train.batch_size": 128, "train.precision": precision}, epochs, device)
    return {"precision": precision, **run}


def alternating(data: str, device: torch.device, epochs: int, rounds: int) -> dict[str, Any]:
    """`speed` in fp32 and bf16, alternating for ``rounds`` rounds (the machine drifts between runs):
    each precision's median round, with every round's examples/s."""
    runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for precision, rows in runs.items():
            rows.append(speed(data, device, precision, epochs))
    out = {}
    for precision, rows in runs.items():
        rates = [r["examples_per_s"] for r in rows]
        out[precision] = {**rows[rates.index(statistics.median_low(rates))], "rounds": rates}
    return out


def quality(data: str, device: torch.device, dataset: str, epochs: int | None) -> dict[str, Any]:
    """Test metrics of one full run on the device against the CPU seeds of the same model-quality row."""
    from ray_rec.train.local import train_local

    overrides: dict[str, object] = {**MODEL, **SCHEDULE, **QUALITY_SET, "train.seed": 0, "data.seed": 0,
                                    "train.patience": 6, "train.epochs": epochs or 60}
    t0 = time.perf_counter()
    run = train_local(data, load_config(None, overrides), device=device, log=lambda msg: None)
    seconds = time.perf_counter() - t0
    stored = STORED / f"model_quality_{dataset}.json"
    cpu = json.loads(stored.read_text())["rows"].get(QUALITY_ROW, {}) if stored.exists() else {}
    seeds = [r["NDCG@10"] for r in cpu.get("runs", {}).values()]
    row = {"NDCG@10": run.test["NDCG@10"], "HR@10": run.test["HR@10"], "best_epoch": run.best_epoch, "seconds": seconds,
           "epochs": len(run.history), "cpu_row": QUALITY_ROW if seeds else None, "cpu_seeds_NDCG@10": seeds}
    if seeds:
        row["within_cpu_spread"] = min(seeds) - 1e-9 <= run.test["NDCG@10"] <= max(seeds) + 1e-9
    return row


def recommend_timing(device: torch.device, catalog: int, calls: int) -> dict[str, Any]:
    """Median seconds of `Recommender.recommend` (k=10, seen items excluded) over a random catalog."""
    from ray_rec.config import ModelConfig
    from ray_rec.predict.recommender import Recommender
    from ray_rec.vocab import RawId, Vocabulary

    torch.manual_seed(0)
    model = InterestModel(ModelConfig(num_items=catalog, dim=64, max_len=50))
    vocab = Vocabulary(ids=[f"i{i}" for i in range(1, catalog + 1)], counts=np.ones(catalog, dtype=np.int64),
                       side_values={}, side_table=np.zeros((catalog, 0), dtype=np.int64))
    rec = Recommender(model, vocab, {"version": "gpu-check"}, "memory", device)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"catalog": catalog}
    for users in (1, 32):
        histories: list[list[RawId]] = [[f"i{i}" for i in rng.integers(1, catalog + 1, 20)] for _ in range(users)]
        if None in vocab.indices(histories[0]):
            raise RuntimeError("the timing's histories must be catalog items (the model's work, not the popularity fallback)")
        rec.recommend(histories, k=10)  # warm-up: kernels, allocator
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            rec.recommend(histories, k=10)
            times.append(time.perf_counter() - t0)
        out[f"{users}_histories_ms"] = 1000 * statistics.median(times)
    return out


def pipeline_rate(data: str, batch_size: int = 128) -> dict[str, Any]:
    """Examples/s of the Ray Data training pipeline alone, as a worker reads an epoch: the median of
    three passes after a first one."""
    import ray

    from ray_rec.data.examples import BUCKET_WINDOW, length_buckets
    from ray_rec.data.examples import collate as collate_batch
    from ray_rec.data.pipeline import example_chunks, training_sequences
    from ray_rec.ray_session import init_ray

    init_ray(1)
    manifest = read_manifest(data)
    cfg = load_config(None, {"train.batch_size": batch_size})
    mcfg = for_data(cfg.model, manifest)
    ds = training_sequences(data, 0, manifest)
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(4):  # the first pass includes Ray Data's start; the pipeline's rate drifts from pass to pass
        t0, n = time.perf_counter(), 0
        for chunk in example_chunks(ds, manifest, mcfg, browse_width(manifest, mcfg.resolved_loss), BUCKET_WINDOW * batch_size):
            for batch in length_buckets(chunk, batch_size, rng):
                n += len(collate_batch(batch)["items"])
        rates.append(n / (time.perf_counter() - t0))
    ray.shutdown()
    return {"examples_per_s": statistics.median(rates[1:]), "passes_examples_per_s": rates}


def ray_train(data: str, gpu: bool, epochs: int) -> dict[str, Any]:
    """`ray-rec train` (one worker, ``--gpu`` on a GPU) for ``epochs`` epochs, no validation."""
    import ray

    from ray_rec.ray_session import init_ray
    from ray_rec.train.trainer import train

    init_ray(1)
    cfg = load_config(None, {"train.epochs": epochs, "train.eval_every": 1000, "train.patience": 1000,
                             "train.final_fit": False})
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        train(data, out, cfg, workers=1, use_gpu=gpu)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    ray.shutdown()
    steady = rows[1:] or rows
    train_s = sum(r["train_s"] for r in steady)
    return {"examples_per_s": sum(r["examples"] for r in steady) / train_s, "wall_s": wall,
            "data_wait_share": sum(r["data_wait_s"] for r in steady) / train_s, "epoch_s": [r["train_s"] for r in rows]}


def serve_rate(data: str, gpu: bool, requests: int) -> dict[str, Any]:
    """The Serve endpoint, its replica on the device (``num_gpus: 1`` on a GPU), ``/v1/recommend`` at
    concurrency 32 behind the product's ingress."""
    from ray_rec.ray_session import use_fast_ingress

    use_fast_ingress()
    from ray import serve

    from bench.serve_load import free_port, load
    from ray_rec.model.artifact import save_model
    from ray_rec.ray_session import init_ray
    from ray_rec.serve.local import start
    from ray_rec.train.local import train_local
    from ray_rec.vocab import Vocabulary

    with tempfile.TemporaryDirectory() as folder:
        run = train_local(data, load_config(None, {"train.epochs": 1, "train.final_fit": False}), evaluate_test=False,
                          log=lambda msg: None)
        vocab = Vocabulary.load(data)
        save_model(run.model, vocab, f"{folder}/model")
        init_ray(1, serving=True)
        port = free_port()
        url = start(f"{folder}/model", "127.0.0.1", port, num_gpus=1 if gpu else 0, device="cuda" if gpu else "cpu")
        try:
            body = {"history": [str(vocab.raw_id(i)) for i in range(1, 21)], "k": 10}
            return asyncio.run(load(f"{url}/v1/recommend", body, 32, requests))
        finally:
            serve.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dataset", default="Beauty")
    parser.add_argument("--quick", action="store_true", help="a small synthetic log and small sizes (checks the script)")
    parser.add_argument("--catalog", type=int, default=1_000_000, help="items of the recommend timing's catalog")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        data = synthetic(scratch) if args.quick else prepared(args.dataset)
        has_ray = importlib.util.find_spec("ray") is not None
        gpu = device.type == "cuda"
        parts: dict[str, Callable[[], Any]] = {
            "speed": lambda: alternating(data, device, 2 if args.quick else 3, 1 if args.quick else 3),
            "quality": lambda: quality(data, device, "synthetic" if args.quick else args.dataset, 2 if args.quick else None),
            "recommend": lambda: recommend_timing(device, 5_000 if args.quick else args.catalog, 3 if args.quick else 20),
            "pipeline": lambda: pipeline_rate(data),
            "ray_train": lambda: ray_train(data, gpu, 2 if args.quick else 4),
            "serve": lambda: serve_rate(data, gpu, 200 if args.quick else 3000),
        }
        report: dict[str, Any] = {"device": device_name(device), "machine": machine(), "torch": torch.__version__,
                                  "dataset": "synthetic (--quick)" if args.quick else args.dataset,
                                  "command": " ".join(["python -m bench.gpu_check", "--device", args.device, *(["--quick"] if args.quick else []),
                                                       *(["--parts", *args.parts] if args.parts != list(PARTS) else [])])}
        for name in args.parts:
            if name in ("pipeline", "ray_train", "serve") and not has_ray:
                report[name] = {"skipped": "Ray is not installed here"}
                print(f"[gpu-check] {name}: skipped (Ray is not installed here)", flush=True)
                continue
            t0 = time.perf_counter()
            report[name] = parts[name]()
            print(f"[gpu-check] {name} ({time.perf_counter() - t0:.0f} s): {json.dumps(report[name])}", flush=True)
    if not args.quick:
        report = merged(report, device.type, args.parts)
    if "examples_per_s" in report.get("pipeline", {}) and "speed" in report:
        report["pipeline"]["over_training"] = report["pipeline"]["examples_per_s"] / report["speed"]["fp32"]["examples_per_s"]
    if args.quick:
        print(json.dumps(report, indent=2))
        return
    stored = stored_runs()  # the committed CPU baseline stays beside a GPU run's row
    stored[device.type] = report
    path = write_json(RESULTS / RESULT, stored)
    print(f"[gpu-check] written to {path} under {device.type!r}")


def stored_runs() -> dict[str, Any]:
    """The results file's rows by device type (this run's results folder, else the committed one)."""
    path, committed = RESULTS / RESULT, STORED / RESULT
    source = path if path.exists() else committed
    return json.loads(source.read_text()) if source.exists() else {}


def merged(report: dict[str, Any], device_type: str, parts: list[str]) -> dict[str, Any]:
    """``report`` over the stored row of its device type when it ran only some parts: a partial rerun
    replaces its parts, keeps the others and adds its command to the row's."""
    earlier = stored_runs().get(device_type) or {}
    if not earlier or set(parts) >= set(PARTS):
        return report
    command = earlier.get("command", "?")
    return {**earlier, **report, "command": command if report["command"] in command else f"{command}; then {report['command']}"}


def synthetic(folder: str) -> str:
    """A small synthetic log, prepared (``--quick``)."""
    import pyarrow.parquet as pq

    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.data.synthetic import SyntheticSpec, generate

    log, _ = generate(SyntheticSpec(users=400, items=300, topics=10))
    pq.write_table(log, f"{folder}/events.parquet")
    prepare(PrepareOptions(input=f"{folder}/events.parquet", output=f"{folder}/data", num_shards=2))
    return f"{folder}/data"


if __name__ == "__main__":
    main()
