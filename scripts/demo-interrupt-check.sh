#!/usr/bin/env bash
# CI: Ctrl-C ends the demo cleanly. Starts `demo/run.sh`, then `make demo`, the
# way a terminal does (a process group of their own, SIGINT not ignored), waits
# until the demo runs, sends SIGINT to the whole group as Ctrl-C does, and
# checks that the demo said it stopped, that demo/run.sh exited 0 and make
# reported no error, and that nothing of the group is left running.
# Usage: scripts/demo-interrupt-check.sh   (the DEMO_*_PORT variables apply)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
	echo "demo-interrupt-check: $*" >&2
	sed 's/^/    /' "$tmp/out" >&2
	exit 1
}

interrupt() { # interrupt COMMAND...: runs it, sends Ctrl-C's SIGINT once the demo runs; sets status
	: >"$tmp/out"
	# perl: a shell started in the background ignores SIGINT, and so would
	# everything it starts; a terminal's foreground job does not.
	set -m # the next background job is a process group of its own, as in a terminal
	perl -e '$SIG{INT} = "DEFAULT"; exec @ARGV or die "exec $ARGV[0]: $!\n"' "$@" >"$tmp/out" 2>&1 &
	local group=$!
	set +m # the group is made; no job reports from here on
	for _ in $(seq 600); do
		grep -q '^caddy-headless demo: running' "$tmp/out" && break
		kill -0 "$group" 2>/dev/null || { wait "$group" || true; fail "$* ended before the demo ran"; }
		sleep 0.5
	done
	grep -q '^caddy-headless demo: running' "$tmp/out" || { kill -KILL -- "-$group"; fail "$*: the demo did not run within 5 min"; }
	kill -INT -- "-$group"
	status=0
	wait "$group" || status=$?
	grep -q '^demo: stopped' "$tmp/out" || fail "$*: no \"demo: stopped\" after Ctrl-C"
	if kill -0 -- "-$group" 2>/dev/null; then
		kill -KILL -- "-$group"
		fail "$*: processes of the demo still running after Ctrl-C"
	fi
}

interrupt demo/run.sh
[ "$status" = 0 ] || fail "demo/run.sh exited $status after Ctrl-C, want 0"
echo "ok   Ctrl-C: demo/run.sh stopped everything and exited 0"

# make itself gets the SIGINT too and, as every interrupted program should,
# ends by it once its job is done (a shell shows 130); what it must not do is
# report the demo as failed.
interrupt make --no-print-directory demo
grep -q '^make: \*\*\*' "$tmp/out" && fail "make reported an error after Ctrl-C"
case $status in 0 | 130) ;; *) fail "make demo ended with status $status after Ctrl-C, want 0 or 130 (SIGINT)" ;; esac
echo "ok   Ctrl-C: make demo stopped everything without an error (status $status)"
