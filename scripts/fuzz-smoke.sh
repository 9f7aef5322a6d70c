#!/usr/bin/env bash
# Runs every fuzz target for a short, bounded time (FUZZTIME, default 20s each),
# one after another on one worker, so CI catches regressions the seed corpora
# miss without taking over the machine. Crashers are written to the package's
# testdata/fuzz/<Target>/ and make the script fail; commit them as regression
# cases once fixed.
#
#   scripts/fuzz-smoke.sh                  # all targets, 20s each
#   FUZZTIME=10m scripts/fuzz-smoke.sh FuzzAnswer
set -euo pipefail
cd "$(dirname "$0")/.."

fuzztime=${FUZZTIME:-20s}
targets=(
	./caddymodule/discovery:FuzzParseService
	./caddymodule/discovery:FuzzAnswer
	./caddymodule:FuzzUnmarshalCaddyfile
	./caddymodule:FuzzHeadlessProxy
	./caddymodule/kubestore:FuzzObjectName
)

for t in "${targets[@]}"; do
	pkg=${t%%:*} name=${t##*:}
	if [[ $# -gt 0 && ! " $* " =~ " $name " ]]; then
		continue
	fi
	if ! grep -qs "^func $name(" "$pkg"/*_test.go; then
		echo "fuzz-smoke: $name not found in $pkg, skipped" >&2
		continue
	fi
	echo "fuzz-smoke: $pkg $name for $fuzztime"
	# New inputs are minimized for up to 60s by default, which would eat a
	# short run: cap it.
	GOMAXPROCS=1 go test -run '^$' -fuzz "^$name\$" -fuzztime "$fuzztime" -fuzzminimizetime 5s -parallel 1 "$pkg"
done
