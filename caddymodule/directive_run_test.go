package caddymodule

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// whoamiBackend is a backend that answers with its name, the path it was asked for
// and the X-Real-IP it was given.
func whoamiBackend(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s real-ip=%s", name, r.URL.Path, r.Header.Get("X-Real-IP"))
	})
}

func portOf(t *testing.T, rawURL string) string {
	t.Helper()
	_, p, err := net.SplitHostPort(strings.TrimPrefix(strings.TrimPrefix(rawURL, "http://"), "https://"))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func freeLoopbackPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return portOf(t, "http://"+l.Addr().String())
}

// TestHeadlessProxyServes runs Caddy in-process on a Caddyfile using the
// directive: paths are routed to different Services, the block's reverse_proxy
// subdirectives apply, https:// reaches a TLS backend, several Services are
// combined, and a DNS change is followed without a reload.
func TestHeadlessProxyServes(t *testing.T) {
	frontend := httptest.NewServer(whoamiBackend("frontend"))
	defer frontend.Close()
	api1 := httptest.NewServer(whoamiBackend("api-1"))
	defer api1.Close()
	api2 := httptest.NewServer(whoamiBackend("api-2"))
	defer api2.Close()
	secure := httptest.NewTLSServer(whoamiBackend("secure"))
	defer secure.Close()

	zone := func(apiPort string) string {
		return `
frontend.bbs.svc.cluster.local. 5 IN A 127.0.0.1
secure.bbs.svc.cluster.local.   5 IN A 127.0.0.1
_http._tcp.backend.bbs.svc.cluster.local. 5 IN SRV 0 100 ` + apiPort + ` api.backend.bbs.svc.cluster.local.
api.backend.bbs.svc.cluster.local. 5 IN A 127.0.0.1
`
	}
	dns := dnstest.Start(t, zone(portOf(t, api1.URL)))

	listen, tlsListen, multiListen := freeLoopbackPort(t), freeLoopbackPort(t), freeLoopbackPort(t)
	cfg, err := adaptCaddyfile(fmt.Sprintf(`{
	admin off
	persist_config off
}
(cluster) {
	resolvers %[1]s
	refresh 100ms
	allow_addresses loopback # the test backends listen on 127.0.0.1
}
http://127.0.0.1:%[2]s {
	@api path /api /api/*
	headless_proxy @api backend.bbs:http {
		import cluster
		header_up X-Real-IP {remote_host}
	}
	headless_proxy frontend.bbs:%[3]s {
		import cluster
	}
}
http://127.0.0.1:%[4]s {
	headless_proxy https://secure.bbs:%[5]s {
		import cluster
		transport http {
			tls_insecure_skip_verify
		}
	}
}
http://127.0.0.1:%[6]s {
	headless_proxy canary.bbs:%[3]s frontend.bbs:%[3]s {
		import cluster
	}
}`, dns.Addr, listen, portOf(t, frontend.URL), tlsListen, portOf(t, secure.URL), multiListen))
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load([]byte(cfg), true); err != nil {
		t.Fatalf("load: %v\n%s", err, cfg)
	}
	defer caddy.Stop()

	get := func(url string) string {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	base := "http://127.0.0.1:" + listen
	for _, c := range []struct{ url, want string }{
		{base + "/", "frontend / real-ip="},
		{base + "/signin", "frontend /signin real-ip="},
		{base + "/api/items", "api-1 /api/items real-ip=127.0.0.1"},
		{"http://127.0.0.1:" + tlsListen + "/x", "secure /x real-ip="},
		// canary.bbs has no records (NXDOMAIN: no ready endpoints); frontend.bbs serves.
		{"http://127.0.0.1:" + multiListen + "/m", "frontend /m real-ip="},
	} {
		if got := get(c.url); got != c.want {
			t.Errorf("GET %s = %q, want %q", c.url, got, c.want)
		}
	}

	// The API moves to another endpoint: followed without a reload.
	dns.MustSet(t, zone(portOf(t, api2.URL)))
	deadline := time.Now().Add(10 * time.Second)
	for got := ""; !strings.HasPrefix(got, "api-2 "); {
		if time.Now().After(deadline) {
			t.Fatalf("endpoint change not followed within 10s; last answer %q", got)
		}
		time.Sleep(20 * time.Millisecond)
		got = get(base + "/api")
	}
}
