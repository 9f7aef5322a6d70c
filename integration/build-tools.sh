#!/usr/bin/env bash
# Builds the integration suite's tool chain (etcd, kube-apiserver, kubectl,
# CoreDNS, Pebble) from the Go module proxy into $HOME/.cache/caddy-headless/bin
# (or $TOOLS_BIN), with a progress line every 20s.
#
# Each tool is its own Go module under tools/<name>/, so their dependency graphs
# never meet. A binary is rebuilt only when its cache key changes: the hash of
# the tool's go.mod, go.sum and Go sources, the Go version and the ldflags.
#
# kubectl is not built when the one on PATH is within Kubernetes' version skew
# of the suite's kube-apiserver (one minor version either way): then
# $bin/kubectl is a link to it.
#
# Usage: build-tools.sh [tool...]   (default: all tools)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${TOOLS_BIN:-$HOME/.cache/caddy-headless/bin}"
mkdir -p "$bin"

kube_version=v1.37.2 # of kube-apiserver and a built kubectl

# Per-tool build target and ldflags.
target_of() {
	case "$1" in
	pebble) echo github.com/letsencrypt/pebble/v2/cmd/pebble ;;
	*) echo . ;;
	esac
}
ldflags_of() {
	case "$1" in
	kube-apiserver | kubectl) local minor=${kube_version#v1.}
		echo "-s -w -X k8s.io/component-base/version.gitVersion=$kube_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*}" ;;
	*) echo "-s -w" ;;
	esac
}

tools=("$@")
if [ ${#tools[@]} -eq 0 ]; then
	tools=(etcd coredns pebble kubectl kube-apiserver)
fi

# path_kubectl prints the path and version of the kubectl on PATH if it is
# within the skew Kubernetes supports (kubectl one minor version older or newer
# than kube-apiserver); else it says why not, on stderr, and fails.
path_kubectl() {
	local k v want=${kube_version#v1.}
	want=${want%%.*}
	k=$(command -v kubectl) || return 1
	v=$("$k" version --client -o json 2>/dev/null | sed -n 's/^ *"gitVersion": *"\(v[0-9][^"]*\)".*/\1/p' | head -n 1)
	if [[ $v =~ ^v1\.([0-9]+)\. ]] && ((BASH_REMATCH[1] >= want - 1 && BASH_REMATCH[1] <= want + 1)); then
		echo "$k $v"
		return 0
	fi
	echo "build-tools: $k is ${v:-of an unknown version}, outside the skew kube-apiserver $kube_version supports (1.$((want - 1))-1.$((want + 1))): kubectl comes from tools/kubectl" >&2
	return 1
}

for t in "${tools[@]}"; do
	dir="$here/tools/$t"
	[ -f "$dir/go.mod" ] || { echo "build-tools: no such tool: $t" >&2; exit 2; }
	if [ "$t" = kubectl ] && found=$(path_kubectl); then
		key="path ${found}"
		if [ "$(cat "$bin/$t.key" 2>/dev/null)" != "$key" ]; then
			ln -sfn "${found%% *}" "$bin/$t"
			echo "$key" >"$bin/$t.key"
		fi
		echo "build-tools: kubectl from PATH: ${found} (within the skew of kube-apiserver $kube_version)"
		continue
	fi
	key="$( { cd "$dir" && cat go.mod go.sum ./*.go; go env GOVERSION; ldflags_of "$t"; } | sha256sum | cut -c1-16)"
	if [ -x "$bin/$t" ] && [ "$(cat "$bin/$t.key" 2>/dev/null)" = "$key" ]; then
		echo "build-tools: $t up to date ($key)"
		continue
	fi
	echo "build-tools: building $t ($key) ..."
	start=$(date +%s)
	# How many packages the build needs (listing also downloads the modules).
	total=$(cd "$dir" && GOFLAGS="${GOFLAGS:-} -mod=mod" go list -deps "$(target_of "$t")" | wc -l) || total=
	(cd "$dir" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=mod" go build -v -buildvcs=false -trimpath -ldflags "$(ldflags_of "$t")" -o "$bin/$t.tmp" "$(target_of "$t")") 2>&1 |
		"$here/../scripts/build-progress.sh" "build-tools: $t" "$total"
	mv "$bin/$t.tmp" "$bin/$t"
	echo "$key" >"$bin/$t.key"
	echo "build-tools: built $t in $(( $(date +%s) - start ))s"
done
