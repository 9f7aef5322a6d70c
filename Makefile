# caddy-headless — see README.md
.PHONY: build test unit lint demo demo-check check-example bench fuzz-smoke integration image test-image

build: ## Caddy with this plugin, at bin/caddy
	./xcaddy/build.sh bin/caddy

unit: ## the plugin's own tests (race detector on), and those of the bench module
	go test -race -count=1 ./...
	cd bench && go test -count=1 ./...

lint:
	@test -z "$$(gofmt -l .)" || { gofmt -l .; echo "gofmt needed"; exit 1; }
	go vet ./...
	cd integration && go vet ./...
	cd bench && go vet ./...
	cd xcaddy/image && go vet ./...

fuzz-smoke: ## every fuzz target for a short bounded time (FUZZTIME, default 20s)
	./scripts/fuzz-smoke.sh

integration: ## end-to-end: real kube-apiserver + CoreDNS + Pebble + Caddy binary + netns "VMs" (root)
	./integration/run.sh

image: ## the container image, without a daemon: bin/image (OCI layout) and bin/caddy-image.tar
	./xcaddy/image.sh

test-image: image ## the image: valid, reproducible, as the Containerfile says; its binary runs from its rootfs as uid 65532 (root)
	cd xcaddy/image && CADDY_BIN=$(CURDIR)/bin/caddy IMAGE_OCI=$(CURDIR)/bin/image go test -count=1 ./...

test: lint unit check-example demo-check fuzz-smoke test-image integration ## everything CI runs

demo: ## the story on loopback: DNS stand-in, endpoints, Caddy over HTTPS; Ctrl-C stops it
	./demo/run.sh

demo-check: ## the demo without a terminal: requests, redirect, zone edits, followed changes; then Ctrl-C ends it cleanly
	DEMO_CHECK=1 ./demo/run.sh
	./scripts/demo-interrupt-check.sh

check-example: ## caddy adapt + validate of Caddyfile.example with bin/caddy (built if stale)
	./scripts/check-example.sh

bench: ## drills against nginx, HAProxy and Caddy's own sources (minutes; needs wrk, nginx, haproxy); writes BENCHMARKS.md
	./scripts/build-if-stale.sh bin/caddy
	cd bench && go build -o ../bin/bench .
	bin/bench -caddy bin/caddy -out BENCHMARKS.md $(BENCH_FLAGS)
