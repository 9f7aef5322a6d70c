#!/usr/bin/env bash
# Builds Caddy v2.11.9 with this checkout's caddy-headless plugin.
# Usage: xcaddy/build.sh [OUTPUT]   (default: bin/caddy)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/bin/caddy}
case "$out" in /*) ;; *) out=$PWD/$out ;; esac
CADDY_VERSION=${CADDY_VERSION:-v2.11.9}
XCADDY_VERSION=v0.4.5
gobin=$(go env GOPATH)/bin
xcaddy=$gobin/xcaddy
if ! [ -x "$xcaddy" ] || ! "$xcaddy" version 2>/dev/null | grep -q "${XCADDY_VERSION#v}"; then
	echo "installing xcaddy $XCADDY_VERSION" >&2
	go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$XCADDY_VERSION"
fi
mkdir -p "$(dirname "$out")"
cd "$root"
# Static (no libc: the same binary goes into a container image) and
# reproducible (-trimpath: no paths of this machine in it). Setting
# XCADDY_GO_BUILD_FLAGS replaces xcaddy's default flags, so they are restated
# (-ldflags "-w -s", the tags); -v names each package compiled, for the progress.
export CGO_ENABLED=0
export XCADDY_GO_BUILD_FLAGS="-v -trimpath -buildvcs=false -ldflags='-w -s' -tags=nobadger,nomysql,nopgx"
# About how many packages a cold build compiles (the build resolves the same
# module graph as this checkout's go.mod); empty if it cannot be listed.
total=$(go list -deps github.com/caddyserver/caddy/v2/cmd/caddy . 2>/dev/null | wc -l) || total=
[ "$total" != 0 ] || total=
echo "building Caddy $CADDY_VERSION with this checkout into $out (with empty Go caches about 4 min on 2 cores; progress every 20s)" >&2
# A pinned pseudo-version on the module side lets xcaddy replace an unpublished
# module with this checkout (a plain "=path" asks the module proxy, which refuses it).
XCADDY_SKIP_CLEANUP=0 "$xcaddy" build "$CADDY_VERSION" \
	--output "$out" \
	--with "github.com/caddy-headless/caddy-headless@v0.0.0-00010101000000-000000000000=$root" 2>&1 |
	"$root/scripts/build-progress.sh" "xcaddy build" "$total"
"$out" list-modules | grep -q '^http.reverse_proxy.upstreams.headless$' ||
	{ echo "build.sh: $out lacks http.reverse_proxy.upstreams.headless" >&2; exit 1; }
echo "built $out" >&2
