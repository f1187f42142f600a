#!/usr/bin/env bash
# Re-vendors three.js (the web page's 3D view) from npm at a pinned version: only the module files the page
# imports, with three.js's LICENSE, into services/orchestrator/web/static/vendor/three/. The page never fetches
# from a CDN. Usage: scripts/vendor_three.sh [VERSION]   (needs npm; run from anywhere)
set -euo pipefail
VERSION=${1:-0.187.0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/services/orchestrator/web/static/vendor/three
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "three@$VERSION" >/dev/null && tar xzf "three-$VERSION.tgz")
FILES=(
  LICENSE
  build/three.module.js
  build/three.core.js
  examples/jsm/loaders/GLTFLoader.js
  examples/jsm/controls/OrbitControls.js
  examples/jsm/utils/BufferGeometryUtils.js
  examples/jsm/utils/SkeletonUtils.js
)
rm -rf "$DEST"
for file in "${FILES[@]}"; do
  mkdir -p "$DEST/$(dirname "$file")"
  cp "$WORK/package/$file" "$DEST/$file"
done
echo "$VERSION" > "$DEST/VERSION"
echo "vendored three@$VERSION into $DEST"
