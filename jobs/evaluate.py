"""Ranking metrics of a model artifact on a split (Ray Data batch inference), as a Ray job.

    ray job submit --working-dir . \
        -- python jobs/evaluate.py --data s3://BUCKET/datasets/clicks \
           --model s3://BUCKET/runs/r1/model --split test --output s3://BUCKET/runs/r1

Arguments are those of `ray-rec evaluate`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs._common import run  # noqa: E402

if __name__ == "__main__":
    run("evaluate")
