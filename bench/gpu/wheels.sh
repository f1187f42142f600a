#!/usr/bin/env bash
# Build the wheels that the GPU machine lacks for bench/gpu/run.sh (the suite, its Ray Serve section included),
# for its Python 3.12 on x86_64, into the ignored folders .whl/ (the project) and .whl-ray/ (Ray Serve), small
# enough for one device call: a call carries 64 MiB in all, working tree and gen/ included.
#   bash bench/gpu/wheels.sh            # then carry [".whl", ".whl-ray", "gen"] (BENCHMARKS.md, GPU method)
# Versions: pyproject.toml's pins, and fixed versions below for the dependencies it does not name. Packages that
# the GPU machine already has at a version our wheels accept (KINDS.md's list: numpy, pillow, torch, aiohttp,
# requests, safetensors, tokenizers, huggingface-hub 1.33, peft, accelerate, ...) are not carried;
# bench/gpu/wheel_set.py checks that every carried wheel's requirements are met by the set or by that machine.
# Two wheels are repacked smaller (bench/gpu/repack_wheel.py): Ray without Java, RLlib, Data, Train, Tune, LLM and
# the dashboard's web client, debug symbols stripped; transformers with only the model families that our code,
# diffusers and peft import (peft imports BloomPreTrainedModel at import time, diffusers' loaders import peft).
set -euo pipefail
cd "$(dirname "$0")/../.."
carry_mib=${MAGIC3D_CARRY_MIB:-63}   # a device call carries 64 MiB in all (wheels, working tree, gen/); 1 MiB spare
raw=${MAGIC3D_WHEEL_CACHE:-/tmp/magic3d-wheels-raw}   # downloads, reused between runs
core=.whl
serve=.whl-ray
python=${PYTHON:-python3}

# Transformers model families kept: ours (CLIP text/vision, T5; auto), what diffusers' pipelines we use pull in,
# and what peft imports at import time (bloom; siglip through diffusers' loaders).
transformers_models=auto,clip,t5,dinov2_with_registers,vit_mae,encoder_decoder,bloom,siglip
ray_drops=(ray/jars/* ray/rllib/* ray/data/* ray/train/* ray/tune/* ray/llm/* ray/dashboard/client/build/*)

pin() { # NAME -> NAME==VERSION from pyproject.toml's dependencies or its gpu extra
  "$python" - "$1" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = re.sub(r"[-_.]+", "-", sys.argv[1]).lower()
for spec in project["dependencies"] + project["optional-dependencies"]["gpu"]:
    name = re.split(r"[=<>\[;! ]", spec, maxsplit=1)[0]
    if re.sub(r"[-_.]+", "-", name).lower() == wanted:
        print(spec.replace("[serve]", "")); break
else:
    sys.exit(f"{sys.argv[1]} is not pinned in pyproject.toml")
EOF
}

core_specs=(
  $(for n in grpcio grpcio-health-checking grpcio-reflection grpcio-status googleapis-common-protos protobuf \
             structlog pydantic diffusers transformers trimesh xatlas diffrp-nvdiffrast minio; do pin "$n"; done)
  pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0 pycryptodome==4.5.0 cffi==2.1.1 pycparser==3.12
)
serve_specs=(
  "$(pin ray)"
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 watchfiles==1.3.0 aiohttp-cors==0.8.1 colorful==0.5.8
  opencensus==0.11.4 opencensus-context==0.1.3 smart-open==9.0.4 mmh3==5.3.1
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-prometheus==0.66b2 opentelemetry-semantic-conventions==0.66b2
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
)

plats=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 \
         manylinux1_x86_64; do
  plats+=(--platform "$p")
done
download() { # DIR SPEC...
  local dir=$1; shift
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plats[@]}" -d "$dir" "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}
mkdir -p "$raw/core" "$raw/serve"
download "$raw/core" "${core_specs[@]}"
download "$raw/serve" "${serve_specs[@]}"

for d in "$core" "$serve"; do
  grep -qx "/$d/" "$(git rev-parse --git-path info/exclude)" 2>/dev/null || echo "/$d/" >> "$(git rev-parse --git-path info/exclude)"
  rm -rf "$d" && mkdir -p "$d"
done
canonical() { tr 'A-Z_.' 'a-z--' <<<"${1%%[=<>]*}"; }
wanted() { # WHEEL SPEC... : whether the wheel is one of the specs (the download cache may hold others)
  local name; name=$(canonical "$(basename "$1" | cut -d- -f1)"); shift
  for spec in "$@"; do [ "$(canonical "$spec")" = "$name" ] && return 0; done; return 1
}
for w in "$raw"/core/*.whl; do
  wanted "$w" "${core_specs[@]}" || continue
  case $(basename "$w") in
    transformers-*) "$python" bench/gpu/repack_wheel.py "$w" "$core" --keep-only "transformers/models=$transformers_models" ;;
    *) cp "$w" "$core/" ;;
  esac
done
for w in "$raw"/serve/*.whl; do
  wanted "$w" "${serve_specs[@]}" || continue
  case $(basename "$w") in
    ray-*) "$python" bench/gpu/repack_wheel.py "$w" "$serve" --strip $(printf -- '--drop %s ' "${ray_drops[@]}") ;;
    *) cp "$w" "$serve/" ;;
  esac
done

"$python" bench/gpu/wheel_set.py "$core" "$serve"
bytes() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
total=$(bytes "$core"/*.whl "$serve"/*.whl)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$((total + tree + $(bytes gen)))
echo "wheels: $core $(mib "$(bytes "$core"/*.whl)") MiB + $serve $(mib "$(bytes "$serve"/*.whl)") MiB =" \
     "$(mib "$total") MiB; tracked tree $(mib "$tree") MiB, gen/ $(mib "$(bytes gen)") MiB;" \
     "one call carries $(mib "$carried") MiB (limit $carry_mib MiB)"
if (( carried > carry_mib * 1048576 )); then
  echo "over budget: wheels, tree and gen/ total $(mib "$carried") MiB > $carry_mib MiB" >&2
  exit 1
fi
