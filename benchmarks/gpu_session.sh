#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, as one script: run it on a GPU machine with the
# checkout and a diffusers wheel in .gpu/whl (git-ignored):
#
#   pip download --no-deps diffusers -d .gpu/whl      # on a machine with network
#   bash benchmarks/gpu_session.sh
#
# Each measurement writes NAME.json (the script's JSON) and NAME.err into $OUT; one that fails or
# runs past its limit does not stop the others. What they answer:
#   train_nchw / train_cl  training img/s, ddpmkit against diffusers, both bf16 autocast, NCHW (both
#                          networks) and channels_last (64x64): which layout train.channels_last
#                          should default to, with ddpmkit's GroupNorms in bf16 under autocast
#                          (unet.GroupNorm)
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
