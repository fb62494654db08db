"""Batch scoring: top-k recommendations for every user of a split, written as Parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from ray_rec import storage
from ray_rec.data.examples import evaluation_examples
from ray_rec.data.pipeline import read_sequences
from ray_rec.model.artifact import load_model


class TopK:
    """``map_batches`` actor: loads the artifact once; each row's every click is its history."""

    def __init__(self, model_uri: str, k: int) -> None:
        self.rec = load_model(model_uri)
        self.k = k

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        cfg = self.rec.config
        ex = evaluation_examples(table, cfg.history_len, cfg.time_buckets, with_target=False)
        ids, scores = self.rec.model.recommend(
            torch.as_tensor(ex["items"]), self.k, exclude=torch.as_tensor(ex["seen"]),
            time_buckets=torch.as_tensor(ex["time_buckets"]),
        )
        users = table.column("user_id").take(pa.array(ex["row"])).to_numpy(zero_copy_only=False)
        raw = np.array([[str(self.rec.vocab.raw_id(int(i))) for i in row] for row in ids.tolist()], dtype=object)
        return {"user_id": users, "items": raw, "scores": scores.numpy().astype(np.float32)}


def batch_score(data: str, model_uri: str, output: str, split: str = "test", k: int = 10) -> int:
    """Write Parquet files (user_id, items: top-k raw ids as strings, scores) to ``output``.

    Files go to ``<output>-staging`` first and replace ``output`` only when all are written.
    Returns the number of users scored.
    """
    load_model(model_uri)  # fail fast on a bad artifact
    staging = output.rstrip("/") + "-staging"
    storage.delete_dir(staging)
    fs, staging_path = storage.resolve(staging)
    ds = read_sequences(data, split).map_batches(
        TopK, fn_constructor_args=(model_uri, k), batch_format="pyarrow", batch_size=512,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    ds.write_parquet(staging_path, filesystem=fs)
    storage.delete_dir(output)
    storage.move_dir(staging, output)
    out_fs, out_path = storage.resolve(output)
    return sum(
        pq.ParquetFile(out_fs.open_input_file(f"{out_path}/{name}")).metadata.num_rows
        for name in storage.list_files(output)
        if name.endswith(".parquet")
    )
