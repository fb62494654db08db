"""Top-k recommendations for every user to Parquet on S3 (Ray Data map_batches), as a Ray job.

    ray job submit --entrypoint-num-cpus=1 --working-dir . \
        -- python jobs/batch_score.py --data s3://BUCKET/datasets/clicks \
           --model s3://BUCKET/runs/r1/model --output s3://BUCKET/recs/2026-11-27 --k 20

Arguments are those of `ray-rec batch-score`.

``--entrypoint-num-cpus=1`` runs this script on a worker node: the head of `cluster.yaml` (and of
`ray-rec local-cluster`) has no CPUs to give, so nothing heavy lands on it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs._common import run  # noqa: E402

if __name__ == "__main__":
    run("batch-score")
