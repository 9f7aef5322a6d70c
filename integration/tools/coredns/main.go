// Command coredns is CoreDNS, built from the Go module proxy with only the
// plugins the integration suite needs: kubernetes for the cluster zone, hosts
// to give the ACME CA an address for the site Caddy serves, cache and forward
// for a node-local DNS cache in front of it (NodeLocal DNSCache's own
// plugins), and bind, errors, log, health and ready.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives are in the order of CoreDNS's plugin.cfg, which is the order a
// query passes through them.
var directives = []string{
	"bind",
	"ready",
	"health",
	"errors",
	"log",
	"cache",
	"hosts",
	"kubernetes",
	"forward",
}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
