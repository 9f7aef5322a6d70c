#!/usr/bin/env bash
# Builds the container image without a container daemon and without pulling
# a base image: bin/caddy (static: CGO_ENABLED=0, -trimpath; rebuilt only if
# stale), then xcaddy/image writes
#   bin/image            an OCI image layout
#   bin/caddy-image.tar  the same image for docker load, podman load, crane push
# and prints the tag, the digest and the platform. Same inputs, same digest.
# Usage: xcaddy/image.sh   (IMAGE_TAG, default caddy-headless:dev)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# xcaddy builds without cgo unless CGO_ENABLED=1; say so, so that an
# environment that sets it cannot make the binary depend on libc.
export CGO_ENABLED=0
./scripts/build-if-stale.sh bin/caddy
cd xcaddy/image
go run . -caddy "$root/bin/caddy" \
	-etc-caddy "$root/deploy/base/Caddyfile" -etc-caddy "$root/deploy/base/sites.caddy" \
	-oci "$root/bin/image" -tar "$root/bin/caddy-image.tar" -tag "${IMAGE_TAG:-caddy-headless:dev}"
