// Package testcaddy runs a Caddyfile inside the test process, on free
// loopback ports for the admin endpoint, HTTP and HTTPS, never on
// caddytest's fixed 2999/9080: a test must run beside any other Caddy on the
// machine, and must never talk to a foreign one. Caddy's state is per
// process, so one Caddy at a time per test binary.
package testcaddy

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile" // the caddyfile adapter
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// Caddy is a running in-process Caddy.
type Caddy struct {
	// Admin is the admin endpoint's host:port.
	Admin string
	// URL is the site's base URL, http://127.0.0.1:<port>/.
	URL string
	// Client talks to it (no keep-alive across tests, a timeout).
	Client *http.Client
}

// Start runs one site: site is the body of the site block served on URL.
// Global options (ports, no persisted config, no trust store, WARN logs)
// come first; globals, if not empty, is added to them. Stopped at cleanup.
func Start(t testing.TB, globals, site string) *Caddy {
	t.Helper()
	var err error
	for range 5 { // a port picked free may be taken before Caddy binds it
		ports := freePorts(t, 3)
		c := &Caddy{
			Admin:  fmt.Sprintf("127.0.0.1:%d", ports[0]),
			URL:    fmt.Sprintf("http://127.0.0.1:%d/", ports[1]),
			Client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}},
		}
		caddyfile := fmt.Sprintf(`{
	admin %s
	http_port %d
	https_port %d
	persist_config off
	grace_period 1ns
	skip_install_trust
	log {
		level WARN
	}
%s
}
http://127.0.0.1:%d {
%s
}`, c.Admin, ports[1], ports[2], globals, ports[1], site)
		if err = Load(caddyfile); err == nil {
			t.Cleanup(func() { caddy.Stop() })
			return c
		}
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	t.Fatalf("in-process Caddy did not start: %v", err)
	return nil
}

// Load adapts a Caddyfile and runs it in this process, replacing the config
// that runs.
func Load(caddyfile string) error {
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return fmt.Errorf("adapting the Caddyfile: %w", err)
	}
	for _, w := range warnings {
		if strings.Contains(w.Message, "not formatted") {
			continue
		}
		return fmt.Errorf("adapting the Caddyfile: %s", w.String())
	}
	return caddy.Load(cfg, true)
}

// freePorts returns n distinct TCP ports free on 127.0.0.1 a moment ago.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}
