#!/bin/sh
# On a lent GPU machine: install the wheels fetch_wheels.sh carried, then bench/engine.py on
# full-size random-weight models. Output goes to $OUT (the device tool brings it back) or /tmp.
# Arguments go to bench/engine.py; the defaults fit sd-turbo in about 6 minutes of an H100:
#   sh bench/gpu/run.sh
#   sh bench/gpu/run.sh --models sdxl-turbo --accelerations sdpa --batches 1 --worker-accelerations sdpa
set -eu
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# /tmp/site holds only the carried wheels. The project is not installed here and needs no
# PYTHONPATH: bench/benchutil.py puts the checkout on sys.path for the bench itself, and its
# `python -m relay|worker` children run in the checkout, which -m puts first on sys.path.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
[ $# -gt 0 ] || set -- --models sd-turbo --accelerations sdpa,compile --batches 1,2,4 --calls 30 \
    --worker-accelerations sdpa,compile --seconds 10
python3 bench/engine.py "$@" 2>"$out/engine-stderr.txt" | tee "$out/engine.txt"
