#!/usr/bin/env bash
# The GPU benchmark runner, one command on the GPU machine (see BENCHMARKS.md):
#   bash bench/gpu/run.sh                       # the suite: hash grid, coarse and fine steps, memory -> $OUT
#   bash bench/gpu/run.sh schedule coarse       # the preset's coarse stage; repeat until it prints "done": true
#   bash bench/gpu/run.sh schedule fine
#   bash bench/gpu/run.sh tests                 # the GPU-marked tests
#   bash bench/gpu/run.sh fidelity [--shapes cone]  # issue 16 at GPU settings (bench.fidelity --gpu-schedule)
#   bash bench/gpu/run.sh priors                # where the priors' SDS time goes; layout variants (bench/prior_speed.py)
#   bash bench/gpu/run.sh encoder               # the scene's VAE encoder forward + backward: eager vs compiled
#   bash bench/gpu/run.sh fp8 [--prior pixel]   # the UNet+CFG with fp8 linears: time and SDS cosine to fp16
#   bash bench/gpu/run.sh sds --priors analytic ...  # one SDS call's time, in-process and through gRPC (bench/guidance_sds.py)
#   bash bench/gpu/run.sh generate --max-seconds 420 [--steps coarse=1000] [--guidance serve]
#                                               # a `magic3d` job through Generate on the local stack, client-timed
#                                               # (--log-level INFO: the services' timestamped events, to split a cold set-up)
# Runs longer than one device command (10 min): bench/gpu/detached.sh starts them detached and waits across commands.
# That machine has torch with CUDA but not this project's other packages: they come as wheels from the ignored
# folders $MAGIC3D_WHEELS (default .whl/) and, for the suite's serve section, $MAGIC3D_SERVE_WHEELS (default
# .whl-ray/, Ray Serve), both filled here by bench/gpu/wheels.sh, installed into a private site directory, never
# into the system. Generated protos come from gen/ (made by `make setup`, carried along).
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels=${MAGIC3D_WHEELS:-.whl}
site=${MAGIC3D_SITE:-/tmp/magic3d-site}
out=${OUT:-out/bench}
state=${MAGIC3D_SCHEDULE_STATE:-/tmp/magic3d-schedule}
serve_wheels=${MAGIC3D_SERVE_WHEELS:-.whl-ray}
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl $(compgen -G "$wheels/rast/*nvdiffrast*.whl" || true) \
    $(compgen -G "$serve_wheels/*.whl" || true) >/dev/null 2>&1
fi
[ -d gen/magic3d ] || { echo "gen/ is missing: run 'make setup' here and carry gen/ along" >&2; exit 2; }
export PYTHONPATH="$site:$PWD:$PWD/gen${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # nvdiffrast's JIT build: the lent GPUs are Hopper
mkdir -p "$out"
case "${1:-suite}" in
  suite) python3 -m bench.gpu_suite --out "$out" "${@:2}" 2>&1 | tee "$out/suite.log" ;;
  schedule) python3 -m bench.schedule --stage "$2" --state "$state" "${@:3}" 2>&1 | tee -a "$out/schedule.log"
            cp "$state/$2.records.json" "$out/" ;;
  priors) python3 -m bench.prior_speed --out "$out" "${@:2}" 2>&1 | tee "$out/prior_speed.log" ;;
  fp8) python3 -m bench.fp8_unet --out "$out" "${@:2}" 2>&1 | tee "$out/fp8_unet.log" ;;
  encoder) python3 -m bench.encoder_speed --out "$out" "${@:2}" 2>&1 | tee "$out/encoder_speed.log" ;;
  fidelity) python3 -m bench.fidelity --gpu-schedule --report-every 60 --json "$out/fidelity.json" "${@:2}" 2>&1 | tee "$out/fidelity.log" ;;
  sds) python3 -m bench.guidance_sds --json "$out/guidance_sds.json" "${@:2}" 2>&1 | tee "$out/guidance_sds.log" ;;
  generate) python3 -m bench.generate_e2e --out "$out" "${@:2}" 2>&1 | tee "$out/generate_e2e.log" ;;
  tests) # the GPU tests and the Triton kernel's CPU tests (this machine lacks the CPU-only suite's packages)
         python3 -m pytest -p no:cacheprovider -o addopts='' -q "${@:2}" tests/test_gpu_*.py tests/test_triton_encoding.py \
           2>&1 | tee "$out/tests.log" ;;
  *) echo "usage: $0 [suite|schedule coarse|schedule fine|priors|encoder|fp8|fidelity|generate|tests] [args]" >&2; exit 2 ;;
esac
