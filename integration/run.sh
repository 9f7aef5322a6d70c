#!/usr/bin/env bash
# Entry point of the end-to-end suite (called by `make test` and .ci/run):
# builds the tool chain (cached in $HOME/.cache/caddy-headless/bin), then runs
# the suite, which builds Caddy from this checkout with xcaddy/build.sh unless
# CADDY_BIN names a binary. Needs root (network namespaces), iproute2 and
# kubectl. Extra arguments go to `go test` (e.g. -run TestStory).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
t0=$(date +%s)
"$here/build-tools.sh"
echo "integration: tool chain ready in $(( $(date +%s) - t0 ))s"

cd "$here"
t1=$(date +%s)
status=0
go test -race -count=1 -v -timeout "${E2E_TIMEOUT:-25m}" "$@" ./... || status=$?
echo "integration: suite finished in $(( $(date +%s) - t1 ))s (exit $status)"
exit $status
