#!/usr/bin/env bash
# `make demo`: the story of docs/design.md end to end on loopback, no cluster needed.
#
#   - a stand-in for the cluster's DNS (answers like CoreDNS) serving
#     demo/run/cluster.zone, a copy of demo/cluster.zone you can edit live;
#   - the endpoints: frontend at 127.0.0.57:8001 (and 127.0.0.58:8001, not in
#     DNS yet), backend at 127.0.0.27:8004 — each says who it is;
#   - Caddy built from this checkout, running Caddyfile.example (through
#     demo/Caddyfile) over HTTPS with a certificate from its own local CA.
#
# Ctrl-C stops everything. DEMO_CHECK=1 (make demo-check) runs the same demo
# without a terminal: it makes the requests, edits the zone, checks that Caddy
# follows, and exits 0 only if all of it worked.
#
# Ports (all on 127.0.0.1) can be moved: DEMO_DNS_PORT (10053), DEMO_HTTPS_PORT
# (10443), DEMO_HTTP_PORT (10080), DEMO_ADMIN_PORT (10019).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

check=${DEMO_CHECK:-0}
export DEMO_RUN=$root/demo/run
export DEMO_HTTPS_PORT=${DEMO_HTTPS_PORT:-10443}
export DEMO_HTTP_PORT=${DEMO_HTTP_PORT:-10080}
export DEMO_ADMIN_PORT=${DEMO_ADMIN_PORT:-10019}
dns=127.0.0.1:${DEMO_DNS_PORT:-10053}
# The demo's endpoints are on loopback, which DNS may not name unless allowed
# (a cluster never does; see allow_addresses in the README).
export HEADLESS_OPTIONS="resolvers $dns
allow_addresses loopback"
zone=$DEMO_RUN/cluster.zone
ca=$DEMO_RUN/caddy/pki/authorities/local/root.crt
site=bbs.test.com

say() { printf '%s\n' "$*"; }
fail() {
	say "demo: $*" >&2
	for log in "$DEMO_RUN"/*.log; do
		[ -s "$log" ] && { say "--- last lines of ${log#"$root"/}" >&2; tail -n 15 "$log" >&2; }
	done
	exit 1
}

if [ "$(uname -s)" != Linux ]; then
	say "demo: the endpoints use 127.0.0.27, .57 and .58, which only Linux routes to loopback without setup;" >&2
	say "      elsewhere, add them as loopback aliases first (macOS: sudo ifconfig lo0 alias 127.0.0.57)." >&2
fi
command -v curl >/dev/null || fail "curl is needed"

# 1. Build (Caddy only if this checkout changed since bin/caddy was built).
./scripts/build-if-stale.sh bin/caddy
go build -o bin/demo-standin ./demo/standin

# 2. Start the cluster stand-in, the endpoints and Caddy.
rm -rf "$DEMO_RUN"
mkdir -p "$DEMO_RUN"
cp demo/cluster.zone "$zone"

pids=()
stop_all() {
	trap - EXIT INT TERM
	((${#pids[@]})) || return 0
	kill -TERM "${pids[@]}" 2>/dev/null || true
	# Whatever has not stopped after 5s is killed (no helper process is left behind).
	local p alive
	for _ in $(seq 50); do
		alive=
		for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
		[ -n "$alive" ] || break
		sleep 0.1
	done
	kill -KILL "${pids[@]}" 2>/dev/null || true
	wait "${pids[@]}" 2>/dev/null || true
	[ "$check" = 1 ] || say "demo: stopped (DNS stand-in, endpoints, Caddy)"
}
trap stop_all EXIT
# Ctrl-C is how the demo ends: everything stops and the script exits 0, so
# `make demo` reports no error. An interrupted check, or TERM, is a failure.
if [ "$check" = 1 ]; then
	trap 'exit 130' INT
else
	trap 'exit 0' INT
fi
trap 'exit 143' TERM

# The DNS stand-in reports every zone change: on the terminal, or in a log for checks.
if [ "$check" = 1 ]; then
	bin/demo-standin dns -listen "$dns" -zone "$zone" >"$DEMO_RUN/dns.log" 2>&1 &
else
	bin/demo-standin dns -listen "$dns" -zone "$zone" &
fi
pids+=($!)
for ep in frontend=127.0.0.57:8001 frontend=127.0.0.58:8001 backend=127.0.0.27:8004; do
	bin/demo-standin backend -name "${ep%%=*}" -listen "${ep#*=}" >>"$DEMO_RUN/endpoints.log" 2>&1 &
	pids+=($!)
done
bin/caddy run --config demo/Caddyfile --adapter caddyfile >"$DEMO_RUN/caddy.log" 2>&1 &
pids+=($!)

fetch() { # fetch PATH: the body; fails on an HTTP error
	curl -sS --fail --max-time 10 --cacert "$ca" --resolve "$site:$DEMO_HTTPS_PORT:127.0.0.1" \
		"https://$site:$DEMO_HTTPS_PORT$1"
}
status() { # status PATH: the HTTP status code only
	curl -s -o /dev/null -w '%{http_code}' --max-time 10 --cacert "$ca" \
		--resolve "$site:$DEMO_HTTPS_PORT:127.0.0.1" "https://$site:$DEMO_HTTPS_PORT$1" || true
}

# Ready when Caddy answers over HTTPS with its certificate (everything started).
for i in $(seq 150); do
	[ "$(jobs -rp | wc -l)" -eq ${#pids[@]} ] || fail "a demo process exited early (port taken?)"
	[ -f "$ca" ] && fetch / >/dev/null 2>&1 && break
	((i < 150)) || fail "Caddy did not answer on https://$site:$DEMO_HTTPS_PORT within 30s"
	sleep 0.2
done

curl_cmd="curl --cacert ${ca#"$root"/} --resolve $site:$DEMO_HTTPS_PORT:127.0.0.1"
if [ "$check" != 1 ]; then
	cat <<EOF

caddy-headless demo: running. Ctrl-C stops it.

  cluster DNS stand-in  $dns, serving ${zone#"$root"/} (edit it; changes show below)
  endpoints             frontend  127.0.0.57:8001  (in DNS)
                        frontend  127.0.0.58:8001  (running, not in DNS yet)
                        backend   127.0.0.27:8004  (SRV record of port "http")
  Caddy                 https://$site:$DEMO_HTTPS_PORT on 127.0.0.1: Caddyfile.example via demo/Caddyfile,
                        certificate from Caddy's local CA; log in ${DEMO_RUN#"$root"/}/caddy.log

From another terminal, in $root:

  # / reaches the frontend; /api, /signin, /signout (and below) the backend
  $curl_cmd https://$site:$DEMO_HTTPS_PORT/
  $curl_cmd https://$site:$DEMO_HTTPS_PORT/api/items
  $curl_cmd https://$site:$DEMO_HTTPS_PORT/signin

  # http:// redirects to https:// on port $DEMO_HTTPS_PORT
  curl -si --resolve $site:$DEMO_HTTP_PORT:127.0.0.1 http://$site:$DEMO_HTTP_PORT/x | grep -i ^location

An endpoint becomes ready: remove the ";" before the 127.0.0.58 line of ${zone#"$root"/}
(or: sed -i 's/^;frontend/frontend/' ${zone#"$root"/}), save, and count who answers /:
within a second both frontends do, without a reload:

  for i in \$(seq 10); do $curl_cmd -s https://$site:$DEMO_HTTPS_PORT/ | cut -d: -f1-2; done | sort | uniq -c

Delete the 127.0.0.57 line and only 127.0.0.58 answers; delete both and / fails (no ready
endpoints) while /api keeps working.

EOF
	wait
	exit 0
fi

# 3. DEMO_CHECK=1: what the README promises, checked.
expect() { # expect PATH TEXT...: the answer to PATH contains every TEXT
	local path=$1 body
	shift
	body=$(fetch "$path") || fail "GET $path failed"
	for want; do
		[[ $body == *"$want"* ]] || fail "GET $path answered \"$body\"; want \"$want\""
	done
	say "ok   GET $path -> $body"
}
eventually() { # eventually DESCRIPTION COMMAND...: COMMAND succeeds within 15s
	local what=$1
	shift
	for _ in $(seq 75); do
		"$@" && { say "ok   $what"; return 0; }
		sleep 0.2
	done
	fail "not within 15s: $what"
}
answers_from() { # answers_from PATH ADDR: one answer came from ADDR
	[[ $(fetch "$1" 2>/dev/null) == *" at $2:"* ]]
}
status_is() { # status_is PATH CODE
	[ "$(status "$1")" = "$2" ]
}
only_from() { # only_from PATH ADDR: ten answers in a row came from ADDR
	for _ in $(seq 10); do answers_from "$1" "$2" || return 1; done
}

expect / "frontend at 127.0.0.57:8001: GET /" "X-Real-IP 127.0.0.1" "X-Forwarded-Proto https" "Host $site:$DEMO_HTTPS_PORT"
expect /api/items "backend at 127.0.0.27:8004: GET /api/items"
expect /signin "backend at 127.0.0.27:8004: GET /signin"
expect /signout/all "backend at 127.0.0.27:8004: GET /signout/all"
expect /apidocs "frontend at 127.0.0.57:8001: GET /apidocs"
redirect=$(curl -s -o /dev/null -w '%{http_code} %{redirect_url}' --max-time 10 \
	--resolve "$site:$DEMO_HTTP_PORT:127.0.0.1" "http://$site:$DEMO_HTTP_PORT/x?y=1") || true
[ "$redirect" = "308 https://$site:$DEMO_HTTPS_PORT/x?y=1" ] ||
	fail "http:// did not redirect to the demo's https:// port (got \"$redirect\", want \"308 https://$site:$DEMO_HTTPS_PORT/x?y=1\")"
followed=$(curl -sS --fail -L --max-time 10 --cacert "$ca" --resolve "$site:$DEMO_HTTP_PORT:127.0.0.1" \
	--resolve "$site:$DEMO_HTTPS_PORT:127.0.0.1" "http://$site:$DEMO_HTTP_PORT/x?y=1") ||
	fail "following the http:// redirect failed"
[[ $followed == *"frontend at 127.0.0.57:8001: GET /x?y=1"* ]] ||
	fail "following the http:// redirect answered \"$followed\"; want the frontend's answer to GET /x?y=1"
say "ok   http:// redirects to https:// on port $DEMO_HTTPS_PORT ($redirect), and following it reaches the frontend"

sed -i 's/^;frontend/frontend/' "$zone"
eventually "endpoint added in DNS: 127.0.0.58 answers /" answers_from / 127.0.0.58
sed -i '/127\.0\.0\.57/d' "$zone"
eventually "endpoint removed from DNS: only 127.0.0.58 answers /" only_from / 127.0.0.58
sed -i '/^frontend/d' "$zone"
eventually "no frontend endpoints (NXDOMAIN): / fails with 503" status_is / 503
expect /api/items "backend at 127.0.0.27:8004"
say "demo check: passed"
