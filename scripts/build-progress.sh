#!/usr/bin/env bash
# Turns the output of `go build -v` (on stdin) into a progress line on stderr
# every 20s: what is being built, packages compiled so far (of how many, when
# known) and the time elapsed; a last line when it is done. Everything that is
# not a package name (downloads, xcaddy's log, compile errors) passes through.
# Usage: go build -v … 2>&1 | scripts/build-progress.sh NAME [TOTAL]
set -uo pipefail
name=$1
total=${2:-}
n=0
elapsed() { printf '%dm%02ds' $((SECONDS / 60)) $((SECONDS % 60)); }
SECONDS=0
last=0
while :; do
	if IFS= read -r -t 5 line; then
		case $line in
		# Import paths have neither blanks nor colons; messages have both.
		'' | *[[:space:]:]* | '#'*) printf '%s\n' "$line" >&2 ;;
		*) n=$((n + 1)) ;;
		esac
	elif (($? <= 128)); then # end of input (more than 128: the 5s passed)
		break
	fi
	if ((SECONDS - last >= 20)); then
		printf '%s: %d%s packages compiled, %s\n' "$name" "$n" "${total:+ of $total}" "$(elapsed)" >&2
		last=$SECONDS
	fi
done
printf '%s: %d packages compiled%s in %s\n' "$name" "$n" "${total:+ (of $total; the others came from the Go build cache)}" "$(elapsed)" >&2
