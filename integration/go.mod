module github.com/caddy-headless/caddy-headless/integration

go 1.26.0
