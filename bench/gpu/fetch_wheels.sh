#!/bin/sh
# Download, here, the wheels that a lent GPU machine lacks (its image has torch, transformers,
# peft, accelerate, safetensors, OpenCV, numpy and uvloop, but nothing can be fetched there).
# They land in .whl/ (git-ignored through .git/info/exclude) for `run` to carry; see bench/README.md.
set -eu
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
pins=$(grep -hE '^(diffusers|websockets|orjson|pydantic|simplejpeg)==' requirements.txt requirements-diffusion.txt)
# pydantic's own needs, at the versions pydantic pins or accepts
pins="$pins pydantic-core==$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')"
pins="$pins annotated-types==0.8.0 typing-inspection==0.4.5 importlib-metadata==10.2.0"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
du -sh .whl && ls .whl
