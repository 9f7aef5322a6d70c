# caddy-headless — see README.md
.PHONY: build test unit lint demo demo-check check-example

build: ## Caddy with this plugin, at bin/caddy
	./xcaddy/build.sh bin/caddy

unit: ## the plugin's own tests (race detector on)
	go test -race -count=1 ./...

lint:
	@test -z "$$(gofmt -l .)" || { gofmt -l .; echo "gofmt needed"; exit 1; }
	go vet ./...

test: lint unit ## everything CI runs

demo: ## the story on loopback: DNS stand-in, endpoints, Caddy over HTTPS; Ctrl-C stops it
	./demo/run.sh

demo-check: ## the demo without a terminal: requests, zone edits, followed changes checked
	DEMO_CHECK=1 ./demo/run.sh

check-example: ## caddy adapt + validate of Caddyfile.example with bin/caddy (built if stale)
	./scripts/check-example.sh
