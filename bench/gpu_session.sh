#!/usr/bin/env bash
# The GPU measurements of issue #15 (item 4), prepared as one command for a session that is lent a GPU, so that
# its device minutes go to measuring, not to setting up. Two steps:
#
#   1. here, on a machine that reaches the package registry:   bash bench/gpu_session.sh fetch
#      (downloads, into .whl/, the Python 3.12 wheels of what vgt needs and the device image lacks; ~8 MB)
#   2. through the device tool:   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)
#      (installs them and vgt into /tmp/site, runs the GPU tests and the benchmarks; JSON and logs land in $OUT)
#
# The device image has Python 3.12 with torch, transformers, accelerate, timm, torchmetrics, tokenizers and the
# rest of vgt's needs, but not diffusers, lpips, pydantic or webdataset (/work/.library/device/KINDS.md).
# Each step has its own time limit, and they run in order of value, so a slow step cannot take the rest with it.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lpips==0.1.4 pydantic==2.14.4 pydantic_core==2.50.5
        annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7)

if [[ "${1:-}" == "fetch" ]]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" && ls .whl
    exit
fi

OUT="${OUT:-/tmp/vgt-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/session.log"

step() {  # step NAME SECONDS COMMAND...: run it with a limit, log it, go on whatever happens (8 files come back)
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/session.log"
    timeout "$limit" "$@" >> "$OUT/session.log" 2>&1
    echo "== $name: exit $?" | tee -a "$OUT/session.log"
}

# in order of value, within the device tool's 600 s a command (the install takes ~20 s)
step gpu-tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step mfu 90 python3 bench/mfu.py --json "$OUT/mfu.json"
step mfu-compile 150 python3 bench/mfu.py --compile --warmup 10 --json "$OUT/mfu-compile.json"
step generate 110 python3 bench/generate.py --batches 1,16,64 --mar-preset '' --json "$OUT/generate.json"
step compile 110 python3 bench/compile.py --batches 1,16 --json "$OUT/compile.json"
tail -n 60 "$OUT/session.log"
