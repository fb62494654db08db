"""`ray-rec evaluate`: ranking metrics of a model artifact on a split, with Ray Data batch inference.

Full ranking over the catalog with the user's seen items excluded, ranking among 100 sampled
negatives, and a popularity baseline (items ranked by their clicks in the train split) on the
same users.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from ray_rec import storage
from ray_rec.data.examples import CLICK, evaluation_examples
from ray_rec.data.manifest import read_manifest
from ray_rec.data.pipeline import read_sequences
from ray_rec.data.schema import check_schema
from ray_rec.device import to_device
from ray_rec.metrics import DEFAULT_KS, RankingMetrics, full_ranks, user_negatives
from ray_rec.predict.ranking import catalog_blocks, interests, rank_targets
from ray_rec.predict.recommender import Recommender, load_model
from ray_rec.predict.user_count import reported_user_count
from ray_rec.progress import users_line
from ray_rec.ray_session import scoring_pool, use_node_cores
from ray_rec.train.lineage import manifest_fingerprint
from ray_rec.vocab import Vocabulary

if TYPE_CHECKING:
    from ray_rec.data.manifest import Manifest

logger = logging.getLogger(__name__)

SAMPLED_NEGATIVES = 100


class EvaluationError(ValueError):
    """The model and the data set do not fit together."""


class RankUsers:
    """``map_batches`` actor: loads the artifact once (on its GPU when Ray gave it one), returns
    each user's target ranks."""

    def __init__(self, model_uri: str, popularity: np.ndarray, seed: int, counter: Any = None) -> None:
        use_node_cores()
        self.rec = load_model(model_uri, device="auto")
        self.popularity = torch.tensor(popularity, dtype=torch.float64)
        self.seed = seed
        self.counter = counter  # a `UserCount` actor, for progress lines

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        cfg = self.rec.config
        arrays = evaluation_examples(table, cfg.history_len, cfg.time_buckets)
        ex = {k: torch.as_tensor(v) for k, v in arrays.items()}
        if not len(ex["targets"]):
            return {"full": np.zeros(0, np.int64), "sampled": np.zeros(0, np.int64), "popularity": np.zeros(0, np.int64)}
        users = table.column("user_id").take(pa.array(arrays["row"])).to_pylist()
        keys = [zlib.crc32(str(user).encode()) for user in users]
        negatives = user_negatives(cfg.num_items, ex["targets"], ex["seen"], SAMPLED_NEGATIVES, keys, self.seed)
        model = self.rec.model
        on = to_device({**ex, "negatives": negatives}, self.rec.device)
        full, sampled = rank_targets(model, interests(model, on["items"], on["time_buckets"]), on["targets"], on["seen"],
                                     on["negatives"])
        assert sampled is not None
        full, sampled = full.cpu(), sampled.cpu()
        popularity = [
            full_ranks(self.popularity.expand(len(ex["targets"][rows]), -1), ex["targets"][rows], ex["seen"][rows])
            for rows in catalog_blocks(len(ex["targets"]), cfg.num_items)
        ]
        if self.counter is not None:
            self.counter.add.remote(len(users))  # not awaited: a count, not a result
        return {"full": full.numpy(), "sampled": sampled.numpy(), "popularity": torch.cat(popularity).numpy()}


def count_clicks(table: pa.Table) -> dict[str, np.ndarray]:
    check_schema(table.schema, "sequence batch", required=("items", "events"))
    items = table.column("items").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    events = table.column("events").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return {"item": items[events == CLICK].astype(np.int64)}


def train_popularity(data: str, num_items: int, manifest: Manifest) -> np.ndarray:
    """Clicks per item in the train split, as scores (N + 1,), with index 0 = padding."""
    counts = np.zeros(num_items + 1, dtype=np.float64)
    clicks = read_sequences(data, "train", manifest).map_batches(count_clicks, batch_format="pyarrow")
    for batch in clicks.iter_batches(batch_format="numpy", batch_size=1 << 20):
        counts += np.bincount(batch["item"], minlength=num_items + 1)
    return popularity_scores(counts)


def popularity_scores(counts: np.ndarray) -> np.ndarray:
    """Click counts (N + 1,) -> scores. Ties are broken by index (lower = more clicks overall in
    the vocabulary) so that equal counts do not all tie with the target."""
    return counts + np.linspace(0.5, 0.0, len(counts))


def evaluate_model(data: str, model_uri: str, split: str = "test", output: str | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None, progress_s: float = 60.0,
                   model: Recommender | None = None, gpu: bool = False) -> dict[str, Any]:
    """Metrics of the artifact at ``model_uri`` on ``split`` of the prepared dataset ``data``;
    ``progress`` gets a line on each stage, every ``progress_s`` seconds the users ranked so far (as
    the scoring actors count them), and a last line on all of them. ``model``: that artifact when
    the caller has loaded it already (the scoring actors load their own copies either way).
    ``gpu``: each scoring actor takes one GPU (`ray_rec.ray_session.scoring_pool`)."""
    say = progress or (lambda msg: logger.info(msg))
    manifest = read_manifest(data)
    if split not in manifest.files:
        raise EvaluationError(f"split {split!r} is not one of {', '.join(manifest.files)}")
    rec = model if model is not None else load_model(model_uri, device="cpu")  # the driver only checks it
    data_vocab = Vocabulary.load(data)
    if data_vocab.ids != rec.vocab.ids:
        raise EvaluationError(
            f"the model at {model_uri} was trained on another item vocabulary than {data} "
            f"({len(rec.vocab)} vs {len(data_vocab)} items): evaluate it on the dataset it was trained on"
        )
    if (rec.info.get("training") or {}).get("fit") == "final" and \
            ((rec.meta.get("lineage") or {}).get("data") or {}).get("manifest_sha256") == manifest_fingerprint(manifest):
        raise EvaluationError(
            f"the model at {model_uri} is the final fit: it was trained again on every click of {data}, the targets of its "
            f"valid and test splits included, so its figures there would measure nothing. Evaluate the split run's model "
            f"(split_model beside it), or train with --no-final-fit")
    say("counting the train split's clicks (the popularity baseline)")
    popularity = train_popularity(data, rec.config.num_items, manifest)
    say(f"ranking the {split} split's users over {rec.config.num_items:,} items")
    lineage = rec.meta.get("lineage") or {}
    ks = tuple(lineage.get("config", {}).get("eval", {}).get("ks", DEFAULT_KS))  # the run's own cut-offs
    acc = {name: RankingMetrics(ks) for name in ("full", "sampled", "popularity")}
    start, users = time.monotonic(), 0
    pool, gpus = scoring_pool(gpu=gpu)
    with reported_user_count(progress_s, say, "ranked") as counter:
        ranks = read_sequences(data, split, manifest).map_batches(
            RankUsers,
            fn_constructor_args=(model_uri, popularity, seed, counter),
            batch_format="pyarrow",
            batch_size=512,
            compute=pool,
            num_gpus=gpus,
        )
        for batch in ranks.iter_batches(batch_format="numpy", batch_size=4096):
            users += len(batch["full"])
            for name, metric in acc.items():
                metric.add(torch.tensor(batch[name]))
    say(users_line(users, max(time.monotonic() - start, 1e-9)))  # the exact total, counted here
    result = {
        "split": split,
        "model": model_uri,
        "model_version": rec.version,
        "full_ranking": acc["full"].result(),
        "sampled_100": acc["sampled"].result(),
        "popularity_full_ranking": acc["popularity"].result(),
        "lineage": rec.meta.get("lineage"),
    }
    if output:
        storage.write_bytes(storage.join(output, f"eval_{split}.json"), json.dumps(result, indent=2).encode())
    return result


def log_to_run(result: dict[str, Any], tracking: str | None) -> bool:
    """Log an evaluation's full-ranking metrics (``test_NDCG_at_10``, ...) to the MLflow run the
    model was trained in, when a tracking URI is given (or set) and the model names a tracked run.
    Returns whether it was sent."""
    from ray_rec.train.tracking import Tracker, tracking_uri

    uri, run = tracking_uri(tracking), (result.get("lineage") or {}).get("tracking")
    if uri is None or not run:
        return False
    tracker = Tracker(uri, run["run_id"])
    tracker.log_metrics({k: v for k, v in result["full_ranking"].items() if k != "count"}, step=0,
                        prefix=f"{result['split']}_")
    return tracker.ok


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a small text table."""
    rows = [("model, full ranking", result["full_ranking"]), ("model, 100 sampled", result["sampled_100"]),
            ("popularity, full ranking", result["popularity_full_ranking"])]
    keys = [k for k in result["full_ranking"] if k != "count"]
    lines = [f"{'':26}" + "".join(f"{k:>9}" for k in keys)]
    for name, m in rows:
        lines.append(f"{name:26}" + "".join(f"{m[k]:9.4f}" for k in keys))
    lines.append(f"({result['full_ranking']['count']:,} users, split {result['split']})")
    return "\n".join(lines)
