"""Batch scoring: top-k recommendations for every user of a split, written as Parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_rec import storage
from ray_rec.data.examples import evaluation_examples
from ray_rec.data.pipeline import read_sequences
from ray_rec.model.artifact import catalog_blocks, load_model
from ray_rec.ray_session import scoring_pool, use_node_cores


class TopK:
    """``map_batches`` actor: loads the artifact once; each row's every click is its history."""

    def __init__(self, model_uri: str, k: int) -> None:
        use_node_cores()
        self.rec = load_model(model_uri)
        self.k = k

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        cfg = self.rec.config
        arrays = evaluation_examples(table, cfg.history_len, cfg.time_buckets, with_target=False)
        ex = {name: torch.as_tensor(v) for name, v in arrays.items()}
        tops = [  # users in blocks: a 512-user batch's catalog scores at 1M items would be 2 GB at once
            self.rec.model.recommend(ex["items"][rows], self.k, exclude=ex["seen"][rows], time_buckets=ex["time_buckets"][rows])
            for rows in list(catalog_blocks(len(ex["items"]), cfg.num_items)) or [slice(0, 0)]  # an empty batch: once, as before
        ]
        ids, scores = torch.cat([i for i, _ in tops]), torch.cat([s for _, s in tops])
        users = table.column("user_id").take(pa.array(arrays["row"])).to_numpy(zero_copy_only=False)
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
        compute=scoring_pool(),
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
