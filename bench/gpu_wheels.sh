#!/usr/bin/env bash
# Here, before a GPU check: the Python packages the GPU machine's image lacks (it has torch, numpy,
# pyarrow, safetensors, pyyaml, pytest; nothing can be fetched there), as wheels for its Python
# 3.12, and Beauty.txt, into .gpu/ (git-ignored; carried with the tree, about 3 MB).
# Ray (an 80 MB wheel with its own dependencies) does not fit the 64 MiB a device call carries:
# without it the check's Ray parts (pipeline, ray-rec train --gpu, Serve) say "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu \
    "pydantic==$("$PY" -c 'import pydantic; print(pydantic.VERSION)')" \
    "pydantic-core==$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')" \
    "annotated-types==$("$PY" -c 'import importlib.metadata as m; print(m.version("annotated-types"))')" \
    "typing-inspection==$("$PY" -c 'import importlib.metadata as m; print(m.version("typing-inspection"))')"
cp "${SHARED_DATA:-../shared/data/amazon}/Beauty.txt" .gpu/
du -sh .gpu
