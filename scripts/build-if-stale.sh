#!/usr/bin/env bash
# Builds bin/caddy (xcaddy/build.sh) unless it is newer than every file it is
# built from. Usage: scripts/build-if-stale.sh [OUTPUT]   (default: bin/caddy)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/bin/caddy}
cd "$root"
# xcaddy/image is the image builder, its own module: not part of Caddy.
if [ -x "$out" ] && [ -z "$(find go.mod go.sum caddyheadless.go caddymodule discovery kubeapi kubestore internal xcaddy -path xcaddy/image -prune -o \
	-newer "$out" \( -name '*.go' -o -name 'go.*' -o -name '*.sh' \) ! -name '*_test.go' -print -quit)" ]; then
	exit 0
fi
./xcaddy/build.sh "$out"
