#!/usr/bin/env bash
# CI: Caddyfile.example (and the demo's Caddyfile, which imports it) must adapt
# and validate with a Caddy built from this checkout; so must every golden
# Caddyfile of caddymodule/testdata/caddyfile_adapt, and each error_* golden
# must fail to adapt with the error it records.
# Usage: scripts/check-example.sh [CADDY]   (default: bin/caddy, built if stale)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
caddy=${1:-}
if [ -z "$caddy" ]; then
	caddy=$root/bin/caddy
	./scripts/build-if-stale.sh "$caddy"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Keep validate's side effects (storage, autosave) out of $HOME.
export XDG_DATA_HOME=$tmp/data XDG_CONFIG_HOME=$tmp/config

check() { # check FILE [ENV...]
	local file=$1
	shift
	env "$@" "$caddy" adapt --config "$file" --adapter caddyfile >"$tmp/adapted.json" 2>"$tmp/adapt.log" ||
		{ cat "$tmp/adapt.log" >&2; echo "check-example: caddy adapt $file failed" >&2; exit 1; }
	grep -q '"source":"headless"' "$tmp/adapted.json" ||
		{ echo "check-example: $file adapted without a headless upstream source" >&2; exit 1; }
	env "$@" "$caddy" validate --config "$file" --adapter caddyfile >"$tmp/validate.log" 2>&1 ||
		{ cat "$tmp/validate.log" >&2; echo "check-example: caddy validate $file failed" >&2; exit 1; }
	echo "check-example: $file adapts and validates"
}
check Caddyfile.example
check demo/Caddyfile DEMO_ADMIN_PORT=10019 DEMO_HTTP_PORT=10080 DEMO_HTTPS_PORT=10443 \
	DEMO_RUN="$tmp/demo" HEADLESS_OPTIONS="resolvers 127.0.0.1:10053
allow_addresses loopback"

n=0
for golden in caddymodule/testdata/caddyfile_adapt/*.caddyfiletest; do
	sed '/^----------$/,$d' "$golden" >"$tmp/Caddyfile"
	want=$(sed '1,/^----------$/d' "$golden")
	case $(basename "$golden") in
	error_*)
		if "$caddy" adapt --config "$tmp/Caddyfile" --adapter caddyfile >/dev/null 2>"$tmp/err.log"; then
			echo "check-example: $golden adapted, but should fail with: $want" >&2
			exit 1
		fi
		# The binary names the file by its path, where the golden says
		# "Caddyfile", and logs the error as a JSON string.
		want=${want//Caddyfile:/$tmp/Caddyfile:}
		want=${want//\\/\\\\}
		want=${want//\"/\\\"}
		grep -qF -- "$want" "$tmp/err.log" ||
			{ cat "$tmp/err.log" >&2; echo "check-example: $golden: want error: $want" >&2; exit 1; }
		;;
	storage_k8s*)
		# validate provisions the storage, which asks its apiserver: these
		# are adapted here, and provisioned against a real apiserver by
		# the integration suite.
		"$caddy" adapt --config "$tmp/Caddyfile" --adapter caddyfile >/dev/null 2>"$tmp/err.log" ||
			{ cat "$tmp/err.log" >&2; echo "check-example: caddy adapt $golden failed" >&2; exit 1; }
		;;
	via_api*)
		# via api without an endpoint takes the pod's apiserver from the
		# environment; validate contacts nothing, so a loopback one will do.
		KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT=6443 \
			"$caddy" validate --config "$tmp/Caddyfile" --adapter caddyfile >"$tmp/validate.log" 2>&1 ||
			{ cat "$tmp/validate.log" >&2; echo "check-example: caddy validate $golden failed" >&2; exit 1; }
		;;
	*)
		"$caddy" validate --config "$tmp/Caddyfile" --adapter caddyfile >"$tmp/validate.log" 2>&1 ||
			{ cat "$tmp/validate.log" >&2; echo "check-example: caddy validate $golden failed" >&2; exit 1; }
		;;
	esac
	n=$((n + 1))
done
# caddyfile_provision: adapts, but `caddy validate` (provisioning) must fail
# with the recorded error (what only provisioning sees, e.g. an lb_policy
# beside `dynamic headless`).
for golden in caddymodule/testdata/caddyfile_provision/*.caddyfiletest; do
	sed '/^----------$/,$d' "$golden" >"$tmp/Caddyfile"
	want=$(sed '1,/^----------$/d' "$golden")
	want=${want##*: provision http.reverse_proxy.upstreams.headless: }
	if "$caddy" validate --config "$tmp/Caddyfile" --adapter caddyfile >/dev/null 2>"$tmp/err.log"; then
		echo "check-example: $golden validated, but should fail with: $want" >&2
		exit 1
	fi
	want=${want//\\/\\\\}
	want=${want//\"/\\\"}
	grep -qF -- "$want" "$tmp/err.log" ||
		{ cat "$tmp/err.log" >&2; echo "check-example: $golden: want error: $want" >&2; exit 1; }
	n=$((n + 1))
done
echo "check-example: $n golden Caddyfiles behave the same with $caddy"
