# caddy-headless — see README.md
.PHONY: build test unit lint

build: ## Caddy with this plugin, at bin/caddy
	./xcaddy/build.sh bin/caddy

unit: ## the plugin's own tests (race detector on)
	go test -race -count=1 ./...

lint:
	@test -z "$$(gofmt -l .)" || { gofmt -l .; echo "gofmt needed"; exit 1; }
	go vet ./...

test: lint unit ## everything CI runs
