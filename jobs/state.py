"""Seed the user-state Redis from a prepared data set, as a Ray job (the writers run on the cluster).

    ray job submit --entrypoint-num-cpus=1 --working-dir . \
        -- python jobs/state.py load --data s3://BUCKET/datasets/clicks --redis redis://redis.internal:6379/0

Arguments are those of `ray-rec state`. The Redis password is read from RAY_REC_REDIS_PASSWORD in
the environment of the nodes' Ray processes (a Secret), never from the command line.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs._common import run  # noqa: E402

if __name__ == "__main__":
    run("state")
