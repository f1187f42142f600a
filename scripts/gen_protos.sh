#!/usr/bin/env bash
# Generates Python messages, gRPC stubs and type stubs for protos/ into gen/ (never edited by hand),
# and puts gen/ on the venv's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=${PYBIN:-.venv/bin/python}
rm -rf gen && mkdir -p gen
"$PYBIN" -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen --pyi_out=gen \
  $(find protos -name '*.proto' | sort)
find gen -type d -exec touch {}/__init__.py \;
rm -f gen/__init__.py
site=$("$PYBIN" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/gen" > "$site/magic3d_generated.pth"
