module github.com/caddy-headless/caddy-headless/internal/proc

go 1.26.0
