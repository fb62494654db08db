"""`ray-rec`: prepare, train, evaluate, serve, state, demo, batch-score, config.

User mistakes (missing paths, bad config, bad input files) end with one clear line and exit 2;
only bugs show a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from ray_rec import __version__
from ray_rec.config import (
    ENGINES,
    FORMATS,
    REDIS_PASSWORD_ENV,
    REDIS_URL_ENV,
    SPLITS,
    PrepareOptions,
    ServeConfig,
    StateConfig,
)

PREPARE = PrepareOptions(input="", output="")  # the defaults the prepare flags show
SERVE = ServeConfig.model_fields  # the defaults the serve flags show
STATE = StateConfig.model_fields

logger = logging.getLogger("ray_rec")


OVERWRITE_HELP = "replace an --output folder that holds files this command did not write"
TRACKING_HELP = "MLflow tracking server to log the run to (default: MLFLOW_TRACKING_URI; unset: no tracking)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-rec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ray-rec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="import event logs into a sharded sequence dataset")
    p.add_argument("--input", required=True, help="log file or folder (local path or s3://)")
    p.add_argument("--format", choices=FORMATS, help=f"the log's format (default {PREPARE.format})")
    p.add_argument("--output", required=True, help="dataset folder to write (local path or s3://)")
    p.add_argument("--config", help="YAML file whose 'prepare:' section sets any flag below (a flag given here wins)")
    p.add_argument("--items", help="item side features: Parquet/CSV with item_id, or MovieLens u.item/movies.dat")
    p.add_argument("--num-shards", type=int,
                   help=f"Parquet files per split, at least; large logs get more, of about 1M events each (default {PREPARE.num_shards})")
    p.add_argument("--min-clicks", type=int, help=f"drop users with fewer clicks (>= 3; default {PREPARE.min_clicks})")
    p.add_argument("--split", choices=SPLITS, help=f"default {PREPARE.split}")
    p.add_argument("--cutoff", help="with --split time: epoch seconds or ISO 8601 time")
    p.add_argument("--expected-events", type=int, help="approximate log size, to size the spill buckets")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--engine", choices=ENGINES,
                   help="local: one process; ray: tasks on the Ray cluster (RAY_ADDRESS, else a local Ray); "
                        "auto (default): ray on a cluster for logs over 50M events")
    p.add_argument("--columns", metavar="FIELD=COLUMN,...",
                   help="events format: the log's column of each field, e.g. user_id=uid,item_id=sku,timestamp=ts,event=action")
    p.add_argument("--click-events", metavar="VALUE,...",
                   help="events format: event values that are clicks (default click,1,true,clicked)")
    p.add_argument("--browse-events", metavar="VALUE,...",
                   help="events format: event values that are browses (default browse,0,false,impression,view,shown); "
                        "any other value is dropped and counted by value in the manifest")

    p = sub.add_parser("train", help="train on Ray Train; writes checkpoints and <output>/model")
    p.add_argument("--data", required=True, help="prepared dataset (local path or s3://)")
    p.add_argument("--output", required=True, help="run folder (local path or s3://)")
    p.add_argument("--config", help="YAML with model, data, train sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field")
    p.add_argument("--workers", type=int, default=2, help="data-parallel training workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    p.add_argument("--resources-per-worker", type=_json_object, metavar="JSON",
                   help='what each worker asks Ray for (default one CPU, or one GPU with --gpu), '
                        'e.g. \'{"CPU": 1, "train_slot": 1}\' to train only on nodes that have the custom resource')
    p.add_argument("--resume", action="store_true", help="continue the run already in --output")
    p.add_argument("--no-final-fit", action="store_true",
                   help="export the split run's best model instead of training it again on every click (train.final_fit=false)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue with data/train/eval settings that differ from the run's (logged)")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--experiment", default="ray_rec", help="MLflow experiment of a tracked run (default ray_rec)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = sub.add_parser("evaluate", help="ranking metrics of a model on a split")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True, help="model artifact folder (local path or s3://)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--output", help="also write eval_<split>.json here")
    p.add_argument("--gpu", action="store_true", help="score on GPUs: one scoring actor per GPU of the cluster")
    p.add_argument("--tracking-uri", help="log the metrics to the MLflow run the model was trained in "
                                          "(default: MLFLOW_TRACKING_URI)")

    p = sub.add_parser("serve", help="serve a model over HTTP in the foreground (Ray Serve)")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=SERVE["max_batch_size"].default,
                   help=SERVE["max_batch_size"].description)
    p.add_argument("--api-key-env", default=SERVE["api_key_env"].default, help=SERVE["api_key_env"].description)
    p.add_argument("--gpu", action="store_true", help="the replica takes one GPU and scores on it")
    p.add_argument("--state", choices=["memory", "redis"], default=STATE["backend"].default,
                   help=f"where the user state that requests by user_id read lives: {STATE['backend'].description} "
                        f"(redis: URL in ${REDIS_URL_ENV}, password in ${REDIS_PASSWORD_ENV})")

    p = sub.add_parser("state", help="the user-state store that requests by user id read")
    state = p.add_subparsers(dest="state_command", required=True, metavar="STATE_COMMAND")
    p = state.add_parser("load", help="write a prepared data set's latest user histories to Redis (replacing "
                                      "those users' stored events)")
    p.add_argument("--data", required=True, help="the prepared data set")
    p.add_argument("--redis", help=f"the Redis URL, without a password (default: ${REDIS_URL_ENV}); the password "
                                   f"is read from ${REDIS_PASSWORD_ENV}")
    p.add_argument("--max-events", type=int, default=STATE["max_events"].default, help=STATE["max_events"].description)
    p.add_argument("--ttl-s", type=int, default=None, help=STATE["ttl_s"].description)
    p.add_argument("--key-prefix", default=STATE["key_prefix"].default, help=STATE["key_prefix"].description)

    p = sub.add_parser("batch-score", help="top-k recommendations for every user of a split, to Parquet")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--gpu", action="store_true", help="score on GPUs: one scoring actor per GPU of the cluster")

    p = sub.add_parser("config", help="print the resolved training configuration as YAML")
    p.add_argument("--config", help="YAML with model, data, train, eval sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field")
    p.add_argument("--data", help="prepared dataset: also fill in what training reads from it (catalog, history length, ...)")
    p.add_argument("--reference", action="store_true", help="print every setting with its type, default and meaning (Markdown)")

    p = sub.add_parser("demo", help="the whole product end to end on synthetic data")
    p.add_argument("--workdir", help="keep the demo's files here (default: a temporary folder)")
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--no-s3", action="store_true", help="use a local folder instead of the loopback S3 server")

    p = sub.add_parser("local-cluster", help="a multi-node Ray cluster on this machine, shaped like cluster.yaml "
                                             "(worker nodes start and stop with the load)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--folder", help="where the cluster keeps its files and token (default ~/.ray_rec/local-cluster)")
    p.add_argument("--idle-timeout-minutes", type=float, default=1.0,
                   help="idle worker nodes are removed after this long (up only; default 1)")
    return parser


def _json_object(text: str) -> dict:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, like '{{\"CPU\": 1}}': {text!r}")
    return value


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ray_rec.config import prepare_settings
    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.data.standard import parse_mapping, parse_timestamps, parse_values

    flags = {"format": args.format, "items": args.items, "num_shards": args.num_shards, "min_clicks": args.min_clicks,
             "split": args.split, "cutoff": args.cutoff, "expected_events": args.expected_events,
             "columns": args.columns, "click_events": args.click_events, "browse_events": args.browse_events,
             "engine": args.engine}
    settings = {**(prepare_settings(args.config) if args.config else {}), **{k: v for k, v in flags.items() if v is not None}}
    if isinstance(settings.get("columns"), str):  # the flag's FIELD=COLUMN,... form (a config file may map instead)
        settings["columns"] = parse_mapping(settings["columns"]) or None
    for key in ("click_events", "browse_events"):
        if isinstance(settings.get(key), str):
            settings[key] = list(parse_values(settings[key]) or ())
    if settings.get("cutoff") is not None:
        import pyarrow as pa

        cutoff = parse_timestamps(pa.array([str(settings["cutoff"])])).to_pylist()[0]
        if cutoff is None:
            raise ValueError(f"cutoff {settings['cutoff']!r} is neither epoch seconds nor ISO 8601")
        settings["cutoff"] = cutoff
    opts = PrepareOptions(input=args.input, output=args.output, overwrite=args.overwrite, **settings)
    manifest = prepare(opts, progress=lambda msg: print(f"[prepare] {msg}", file=sys.stderr, flush=True))
    c = manifest.counts
    print(f"prepared {args.output}: {c.users:,} users, {c.items:,} items, {c.events:,} events "
          f"({c.clicks:,} clicks) in {manifest.num_shards} shards")
    print("dropped: " + ", ".join(f"{k} {v:,}" for k, v in manifest.dropped.items()))
    if manifest.dropped_event_values:
        print("dropped event values: " + ", ".join(f"{k!r} {v:,}" for k, v in list(manifest.dropped_event_values.items())[:10]))
    return 0



def _cmd_train(args: argparse.Namespace) -> int:
    from ray_rec.config import load_config, parse_overrides
    from ray_rec.data.manifest import read_manifest
    from ray_rec.ray_session import check_gpus, init_ray
    from ray_rec.train.trainer import check_resources, train

    overrides = parse_overrides(args.set)
    if args.no_final_fit:
        overrides["train.final_fit"] = False
    config = load_config(args.config, overrides)
    read_manifest(args.data)  # fail fast, before Ray starts
    check_resources(args.resources_per_worker)
    init_ray(args.workers)
    check_gpus(args.gpu, lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True))
    result = train(args.data, args.output, config, workers=args.workers, use_gpu=args.gpu,
                   resources_per_worker=args.resources_per_worker, resume=args.resume,
                   overwrite=args.overwrite, allow_changes=args.allow_changes, tracking=args.tracking_uri,
                   experiment=args.experiment)
    print(f"trained: best epoch {result.best_epoch} of {result.epochs_run}, {json.dumps(result.best_metrics)}; "
          f"{result.seconds:.0f} s")
    print(f"model artifact: {result.model_uri}" + (" (the final fit: trained again on every click)" if result.final_fit else ""))
    if result.tracking:
        print(f"MLflow run {result.tracking['run_id']} at {result.tracking['uri']}")
    print(f"next: ray-rec evaluate --data {args.data} --model {result.split_model_uri or result.model_uri}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ray_rec.data.manifest import read_manifest
    from ray_rec.predict import load_model
    from ray_rec.predict.evaluate import evaluate_model, format_table, log_to_run
    from ray_rec.ray_session import check_gpus, init_ray
    from ray_rec.train.lineage import describe

    read_manifest(args.data)  # fail fast, before Ray starts
    rec = load_model(args.model, device="cpu")  # fail fast; the scoring actors load their own
    init_ray(1)
    check_gpus(args.gpu, lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True))
    result = evaluate_model(args.data, args.model, split=args.split, output=args.output, model=rec, gpu=args.gpu,
                            progress=lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True))
    print(describe(result["lineage"]))
    print(format_table(result))
    print(json.dumps(result))
    log_to_run(result, args.tracking_uri)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ray_rec.ray_session import use_fast_ingress

    use_fast_ingress()  # before Serve is imported: it reads the variables once
    from ray_rec.serve.local import serve_foreground

    serve_foreground(args.model, args.host, args.port, args.max_batch_size, args.api_key_env, args.gpu, args.state)
    return 0


def _cmd_batch_score(args: argparse.Namespace) -> int:
    from ray_rec.data.manifest import read_manifest
    from ray_rec.predict import load_model
    from ray_rec.predict.batch_score import batch_score
    from ray_rec.ray_session import check_gpus, init_ray
    from ray_rec.train.lineage import describe

    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}")
    read_manifest(args.data)  # fail fast, before Ray starts
    rec = load_model(args.model, device="cpu")  # fail fast; the scoring actors load their own
    init_ray(1)
    check_gpus(args.gpu, lambda msg: print(f"[batch-score] {msg}", file=sys.stderr, flush=True))
    n = batch_score(args.data, args.model, args.output, split=args.split, k=args.k, model=rec, overwrite=args.overwrite,
                    gpu=args.gpu,
                    progress=lambda msg: print(f"[batch-score] {msg}", file=sys.stderr, flush=True))
    print(f"wrote top-{args.k} recommendations for {n:,} users to {args.output}")
    print(f"model {rec.version}: {describe(rec.meta.get('lineage'))}")
    return 0


def _cmd_state(args: argparse.Namespace) -> int:
    import os

    from ray_rec.data.manifest import read_manifest
    from ray_rec.ray_session import init_ray
    from ray_rec.serve.state_load import connect, load_state

    state = StateConfig(backend="redis", max_events=args.max_events, ttl_s=args.ttl_s, key_prefix=args.key_prefix)
    url = args.redis or os.environ.get(REDIS_URL_ENV, "").strip()
    if not url:
        raise ValueError(f"give the Redis URL with --redis or in ${REDIS_URL_ENV}")
    password = os.environ.get(REDIS_PASSWORD_ENV, "").strip() or None
    read_manifest(args.data)  # fail fast, before Ray starts
    connect(url, password).close()
    init_ray(1)
    written = load_state(args.data, url, password, state,
                         progress=lambda msg: print(f"[state load] {msg}", file=sys.stderr, flush=True))
    print(f"stored the users' latest histories in Redis (users written by split, a later split's replacing an "
          f"earlier one's: {', '.join(f'{k} {v:,}' for k, v in written.items())})")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from ray_rec.config import for_data, load_config, parse_overrides
    from ray_rec.reference import reference

    if args.reference:
        print(reference(), end="")
        return 0
    config = load_config(args.config, parse_overrides(args.set))
    if args.data:
        from ray_rec.data.manifest import read_manifest

        config = dataclasses.replace(config, model=for_data(config.model, read_manifest(args.data)))
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ray_rec.ray_session import use_fast_ingress

    use_fast_ingress()  # before Serve is imported: it reads the variables once
    from ray_rec.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(workdir=args.workdir, users=args.users, epochs=args.epochs, use_s3=not args.no_s3))


def _cmd_local_cluster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ray_rec import local_cluster

    folder = Path(args.folder) if args.folder else local_cluster.DEFAULT_FOLDER
    if args.action == "down":
        local_cluster.stop(folder)
        print(f"stopped the local cluster of {folder}")
        return 0
    if args.action == "up":
        cluster = local_cluster.start(folder, idle_timeout_minutes=args.idle_timeout_minutes)
    else:
        cluster = local_cluster.attach(folder)
    nodes = cluster.worker_nodes()
    print(f"head: {cluster.gcs_address} (takes no work); worker nodes now: {len(nodes)} "
          f"({', '.join(sorted(n['type'] for n in nodes)) or 'none: they start when work asks for them'})")
    print("use it from this shell:")
    print(f"  export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token_path}")
    print("  ray job submit --entrypoint-num-cpus=1 --working-dir . -- python jobs/prepare.py ...")
    print(f"stop it: ray-rec local-cluster down{' --folder ' + args.folder if args.folder else ''}")
    return 0


COMMANDS = {
    "prepare": _cmd_prepare,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "serve": _cmd_serve,
    "batch-score": _cmd_batch_score,
    "state": _cmd_state,
    "demo": _cmd_demo,
    "config": _cmd_config,
    "local-cluster": _cmd_local_cluster,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ray_rec.errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"ray-rec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ray-rec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
