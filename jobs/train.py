"""Train on Ray Train (data-parallel workers, checkpoints to S3), as a Ray job.

    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"AWS_DEFAULT_REGION": "us-east-1"}}' \
        -- python jobs/train.py --data s3://BUCKET/datasets/clicks \
           --output s3://BUCKET/runs/r1 --workers 4 [--gpu] [--config my.yaml] [--resume]

Arguments are those of `ray-rec train`. The job joins the cluster it runs on (RAY_ADDRESS is set
by Ray for jobs); the model artifact lands in <output>/model. The script itself only coordinates
(it may run on the head); the workers ask for a GPU each with ``--gpu``, or for what
``--resources-per-worker`` names.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs._common import run  # noqa: E402

if __name__ == "__main__":
    run("train")
