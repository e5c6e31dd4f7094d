#!/usr/bin/env bash
# The GPU measurements issues 4 and 8 still owe (benchmarks/RESULTS.md), as one device-tool call of
# about 8 minutes on an H100, so a session lent a GPU spends its few minutes measuring, not writing.
#
# Here, first:   pip download --no-deps diffusers -d .gpu/whl     (.gpu/ is git-ignored)
# Device tool:   run(command="bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=600)
#
# Each measurement writes NAME.json (the script's JSON) and NAME.err into $OUT; one that fails or
# runs past its limit does not stop the others. What they answer:
#   train_nchw / train_cl  training img/s, ddpmkit against diffusers, both bf16 autocast, NCHW (both
#                          networks) and channels_last (64x64): which layout train.channels_last
#                          should default to, now that ddpmkit's GroupNorms stay in bf16 under
#                          autocast (unet.GroupNorm)
#   sample_job             the seed's 5,900-image 64x64 job, eager, both with bf16 weights
#                          (diffusers in channels_last, as its docs advise): never timed end to
#                          end eager
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONPATH=src
python3 -c 'import diffusers' 2>/dev/null || pip install -q --no-deps --no-index .gpu/whl/*.whl
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
  python3 -c 'import torch; print(torch.__version__)'; } \
  > "$out/machine.txt" 2>&1

measure() {  # NAME SECONDS SCRIPT ARGS...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" python3 "$@" > "$out/$name.json" 2> "$out/$name.err"
  echo "$name: exit $? in $((SECONDS - t0)) s"
}

common=(--device cuda --batch 128 --bf16 --warmup 10 --interval 10)
measure train_nchw 180 benchmarks/train_speed.py "${common[@]}" --arch all
measure train_cl 120 benchmarks/train_speed.py "${common[@]}" --arch 64px --channels-last
measure sample_job 280 benchmarks/sample_speed.py --device cuda --job --batch 256 --steps 50 \
  --bf16 --channels-last
