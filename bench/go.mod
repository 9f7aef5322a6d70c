module github.com/caddy-headless/caddy-headless/bench

go 1.26.8

require github.com/caddy-headless/caddy-headless v0.0.0-00010101000000-000000000000

require (
	github.com/miekg/dns v1.1.73 // indirect
	golang.org/x/net v0.60.0 // indirect
	golang.org/x/sys v0.48.0 // indirect
)

replace github.com/caddy-headless/caddy-headless => ../
