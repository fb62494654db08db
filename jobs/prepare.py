"""Import event logs into a sharded sequence dataset, as a Ray job.

    ray job submit --entrypoint-num-cpus=1 --working-dir . \
        --runtime-env-json '{"env_vars": {"AWS_DEFAULT_REGION": "us-east-1"}}' \
        -- python jobs/prepare.py --input s3://BUCKET/logs/ --format events \
           --output s3://BUCKET/datasets/clicks --num-shards 32

Arguments are those of `ray-rec prepare` (see `ray-rec prepare --help`).

``--entrypoint-num-cpus=1`` runs this script on a worker node: the head of `cluster.yaml` (and of
`ray-rec local-cluster`) has no CPUs to give, so nothing heavy lands on it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs._common import run  # noqa: E402

if __name__ == "__main__":
    run("prepare")
