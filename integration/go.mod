module github.com/caddy-headless/caddy-headless/integration

go 1.26.0

require github.com/miekg/dns v1.1.73

require (
	golang.org/x/net v0.57.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
)

require github.com/caddy-headless/caddy-headless/internal/proc v0.0.0-00010101000000-000000000000

replace github.com/caddy-headless/caddy-headless/internal/proc => ../internal/proc
