#!/bin/sh
# On a lent GPU machine: install the wheels fetch_wheels.sh carried, then bench/engine.py on
# full-size random-weight models. Output goes to $OUT (the device tool brings it back) or /tmp.
# Arguments go to bench/engine.py; the defaults fit sd-turbo in under 8 minutes of an H100 (estimated:
# build 0.5, engine rows 3.5 (two torch.compile builds), worker sdpa rows 0.7, streams rows 1.5 (9 loads),
# memory rows 1 (3 processes)):
#   sh bench/gpu/run.sh
#   sh bench/gpu/run.sh --models sd-turbo --accelerations "" --worker-accelerations sdpa,compile \
#       --streams "" --memory 0                       # the compiled worker rows (about 4 minutes)
#   sh bench/gpu/run.sh --models sdxl-turbo --accelerations sdpa --batches 1 --worker-accelerations sdpa \
#       --streams 1,4 --memory 4
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
[ $# -gt 0 ] || set -- --models sd-turbo --accelerations sdpa,compile --batches 1,4 --calls 30 \
    --worker-accelerations sdpa --seconds 10 --streams 1,2,4,8 --stream-seconds 5 --memory 4
python3 bench/engine.py "$@" 2>"$out/engine-stderr.txt" | tee "$out/engine.txt"
