# The image the KubeRay manifests (deploy/kuberay/) run: the official Ray image of the Ray version
# this project is tested with, plus ray_rec and its dependencies from this checkout (never from
# the public package index, where `ray-rec` is not ours to publish).
#
#   docker build -t YOUR-REGISTRY/ray-rec:0.1.0 .                               # CPU nodes
#   docker build --build-arg VARIANT=gpu -t YOUR-REGISTRY/ray-rec:0.1.0-gpu .   # GPU nodes (CUDA torch)
#
# RAY_VERSION must equal the manifests' rayVersion (tests/test_cluster.py checks both against the
# Ray the tests run). Not built in this project's CI (no registry access there).
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0

# torch first, from PyTorch's own index: the CPU build for CPU nodes (an unpinned torch from the
# package index is the multi-GB CUDA build), the default CUDA build for GPU nodes.
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi

# The package itself; the image's Ray already satisfies the `ray[...]` requirement, so pip keeps it.
COPY --chown=ray:users pyproject.toml README.md /home/ray/ray_rec/
COPY --chown=ray:users ray_rec /home/ray/ray_rec/ray_rec
RUN pip install --no-cache-dir /home/ray/ray_rec && rm -rf /home/ray/ray_rec

# The job entry points and serve configs, for `ray job submit -- python jobs/...` without a working dir.
COPY --chown=ray:users jobs /home/ray/jobs
COPY --chown=ray:users serve_configs /home/ray/serve_configs
WORKDIR /home/ray
