#!/usr/bin/env bash
# Builds the integration suite's tool chain (etcd, kube-apiserver, kubectl,
# CoreDNS, Pebble) from the Go module proxy into $HOME/.cache/caddy-headless/bin
# (or $TOOLS_BIN).
#
# Each tool is its own Go module under tools/<name>/, so their dependency graphs
# never meet. A binary is rebuilt only when its cache key changes: the hash of
# the tool's go.mod, go.sum and Go sources, the Go version and the ldflags.
#
# Usage: build-tools.sh [tool...]   (default: all tools)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${TOOLS_BIN:-$HOME/.cache/caddy-headless/bin}"
mkdir -p "$bin"

# Per-tool build target and ldflags.
target_of() {
	case "$1" in
	pebble) echo github.com/letsencrypt/pebble/v2/cmd/pebble ;;
	*) echo . ;;
	esac
}
ldflags_of() {
	case "$1" in
	kube-apiserver | kubectl) echo "-s -w -X k8s.io/component-base/version.gitVersion=v1.37.2 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37" ;;
	*) echo "-s -w" ;;
	esac
}

tools=("$@")
if [ ${#tools[@]} -eq 0 ]; then
	tools=(etcd coredns pebble kubectl kube-apiserver)
fi

for t in "${tools[@]}"; do
	dir="$here/tools/$t"
	[ -f "$dir/go.mod" ] || { echo "build-tools: no such tool: $t" >&2; exit 2; }
	key="$( { cd "$dir" && cat go.mod go.sum ./*.go; go env GOVERSION; ldflags_of "$t"; } | sha256sum | cut -c1-16)"
	if [ -x "$bin/$t" ] && [ "$(cat "$bin/$t.key" 2>/dev/null)" = "$key" ]; then
		echo "build-tools: $t up to date ($key)"
		continue
	fi
	echo "build-tools: building $t ($key) ..."
	start=$(date +%s)
	(cd "$dir" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=mod" go build -buildvcs=false -trimpath -ldflags "$(ldflags_of "$t")" -o "$bin/$t.tmp" "$(target_of "$t")")
	mv "$bin/$t.tmp" "$bin/$t"
	echo "$key" >"$bin/$t.key"
	echo "build-tools: built $t in $(( $(date +%s) - start ))s"
done
