module github.com/caddy-headless/caddy-headless/integration

go 1.26.8

require (
	// dnstest only, for TestClusterDNSAnswers (it needs nothing of Caddy).
	github.com/caddy-headless/caddy-headless v0.0.0-00010101000000-000000000000
	github.com/caddy-headless/caddy-headless/internal/proc v0.0.0-00010101000000-000000000000
	github.com/miekg/dns v1.1.73
)

require (
	golang.org/x/net v0.60.0 // indirect
	golang.org/x/sys v0.48.0 // indirect
)

replace (
	github.com/caddy-headless/caddy-headless => ../
	github.com/caddy-headless/caddy-headless/internal/proc => ../internal/proc
)
