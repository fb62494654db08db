"""Ranking metrics of a model artifact on a split (Ray Data batch inference), as a Ray job.

    ray job submit --entrypoint-num-cpus=1 --working-dir . \
        -- python jobs/evaluate.py --data s3://BUCKET/datasets/clicks \
           --model s3://BUCKET/runs/r1/model --split test --output s3://BUCKET/runs/r1

Arguments are those of `ray-rec evaluate`.

``--entrypoint-num-cpus=1`` runs this script on a worker node: the head of `cluster.yaml` (and of
`ray-rec local-cluster`) has no CPUs to give, so nothing heavy lands on it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs._common import run  # noqa: E402

if __name__ == "__main__":
    run("evaluate")
