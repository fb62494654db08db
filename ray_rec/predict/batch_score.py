"""Batch scoring: top-k recommendations for every user of a split, written as Parquet."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from ray_rec import storage
from ray_rec.data.examples import evaluation_examples
from ray_rec.data.pipeline import read_sequences
from ray_rec.device import to_device
from ray_rec.predict.ranking import interests, top_k
from ray_rec.predict.recommender import Recommender, load_model
from ray_rec.predict.user_count import reported_user_count
from ray_rec.ray_session import scoring_pool, use_node_cores
from ray_rec.vocab import Vocabulary

logger = logging.getLogger(__name__)


class TopK:
    """``map_batches`` actor: loads the artifact once (on its GPU when Ray gave it one); each row's
    every click is its history."""

    def __init__(self, model_uri: str, k: int, counter: ray.actor.ActorHandle | None = None) -> None:
        use_node_cores()
        self.rec = load_model(model_uri, device="auto")
        self.k = k
        self.counter = counter

    def __call__(self, table: pa.Table) -> pa.Table:
        cfg = self.rec.config
        arrays = evaluation_examples(table, cfg.history_len, cfg.time_buckets, with_target=False)
        ex = to_device({name: torch.as_tensor(v) for name, v in arrays.items()}, self.rec.device)
        model = self.rec.model
        ids, scores = top_k(model, interests(model, ex["items"], ex["time_buckets"]), self.k, exclude=ex["seen"])
        ids, scores = ids.cpu(), scores.cpu()
        users = table.column("user_id").take(pa.array(arrays["row"]))
        if self.counter is not None:
            self.counter.add.remote(len(users))  # not awaited: a count, not a result
        items, item_scores = top_k_columns(self.rec.vocab, ids, scores)
        return pa.table({"user_id": users, "items": items, "scores": item_scores})


def top_k_columns(vocab: Vocabulary, ids: torch.Tensor, scores: torch.Tensor) -> tuple[pa.ListArray, pa.ListArray]:
    """Top-k indices and scores (B, k) -> list<string> raw ids and list<float> scores, one row per
    user, without the places the catalog ran out (score -inf: every item excluded), as
    `Recommender.predict` leaves them out. Plain Parquet types that any reader takes: a 2-D
    object array would reach Parquet as Ray's pickled-object extension type, bytes to anything but Ray."""
    keep = scores != float("-inf")
    offsets = pa.array(np.concatenate([[0], np.cumsum(keep.sum(dim=1).numpy())]), pa.int32())
    raw = pa.array([str(vocab.raw_id(i)) for i in ids[keep].tolist()], pa.string())
    return (pa.ListArray.from_arrays(offsets, raw),
            pa.ListArray.from_arrays(offsets, pa.array(scores[keep].numpy().astype(np.float32))))


def batch_score(data: str, model_uri: str, output: str, split: str = "test", k: int = 10,
                progress: Callable[[str], None] | None = None, progress_s: float = 60.0,
                model: Recommender | None = None, overwrite: bool = False, gpu: bool = False) -> int:
    """Write Parquet files (user_id, items: top-k raw ids as strings, scores) to ``output``.

    Files go to a new ``<output>.staging-<id>`` first and replace ``output`` only when all are
    written. ``output`` must be new, empty or an earlier batch-score output unless ``overwrite``, and
    never holds the model or the data (`storage.claim_output`).
    ``progress`` gets a line on each stage and, every ``progress_s`` seconds, the users scored so far.
    ``model``: the artifact at ``model_uri`` when the caller has loaded it already (the scoring
    actors load their own copies either way). ``gpu``: each scoring actor takes one GPU. Returns the
    number of users scored.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    say = progress or (lambda msg: logger.info(msg))
    rec = model if model is not None else load_model(model_uri, device="cpu")  # fail fast on a bad artifact
    storage.claim_output(output, "batch-score", overwrite, reads=(data, model_uri))
    staging = f"{output.rstrip('/')}.staging-{uuid.uuid4().hex[:8]}"
    fs, staging_path = storage.resolve(staging)
    say(f"ranking the {split} split's users over {rec.config.num_items:,} items, top {k} each, to {staging}")
    pool, gpus = scoring_pool(gpu=gpu)
    try:
        with reported_user_count(progress_s, say, "scored") as counter:
            read_sequences(data, split).map_batches(
                TopK, fn_constructor_args=(model_uri, k, counter), batch_format="pyarrow", batch_size=512,
                compute=pool, num_gpus=gpus,
            ).write_parquet(staging_path, filesystem=fs)
        storage.mark_output(staging, "batch-score", {"model": {"uri": model_uri, "version": rec.version,
                                                                "lineage": rec.meta.get("lineage")}})
    except BaseException:
        storage.delete_dir(staging)  # this run's own staging folder, nothing else
        raise
    say(f"all users written; moving them to {output}")
    storage.delete_dir(output)
    storage.move_dir(staging, output)
    out_fs, out_path = storage.resolve(output)
    return sum(
        pq.ParquetFile(out_fs.open_input_file(f"{out_path}/{name}")).metadata.num_rows
        for name in storage.list_files(output)
        if name.endswith(".parquet")
    )
