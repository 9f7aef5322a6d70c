#!/usr/bin/env bash
# Entry point of the end-to-end suite (called by `make test` and .ci/run):
# builds the tool chain (cached in $HOME/.cache/caddy-headless/bin), then runs
# the suite, which uses the checkout's bin/caddy (built by xcaddy/build.sh if
# stale) unless CADDY_BIN names a binary. Needs root (network namespaces) and
# iproute2.
# Extra arguments go to `go test` (e.g. -run TestStory).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# One suite per machine: it owns fixed network namespace names and addresses.
# A second run waits here instead of killing the first one's processes
# (its own lock file: callers may hold /tmp/chl-e2e.lock around it).
if [ -z "${CHL_E2E_LOCKED:-}" ] && command -v flock >/dev/null; then
	export CHL_E2E_LOCKED=1
	exec flock /tmp/chl-e2e-suite.lock "$0" "$@"
fi
t0=$(date +%s)
"$here/build-tools.sh"
echo "integration: tool chain ready in $(( $(date +%s) - t0 ))s"

cd "$here"
# A missing tool binary fails the suite here instead of skipping every test
# (main_test.go): under make test and CI a suite of skips must not say ok.
export E2E_REQUIRE_TOOLS=1
t1=$(date +%s)
status=0
go test -race -count=1 -v -timeout "${E2E_TIMEOUT:-25m}" "$@" ./... || status=$?
echo "integration: suite finished in $(( $(date +%s) - t1 ))s (exit $status)"
# The suite removes its network namespaces itself, also when a test fails; a
# killed or timed-out run leaves them to the next run, or to this.
for ns in $(ip netns list 2>/dev/null | awk '/^chl-/ {print $1}'); do
	ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
	ip netns del "$ns" || true
done
exit $status
