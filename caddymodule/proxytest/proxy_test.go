// Package proxytest runs Caddy in this process (testcaddy, on free ports) with
// `reverse_proxy { dynamic headless … }` in front of real HTTP backends on
// loopback, and shows the traffic following DNS. It is its own package so that
// Caddy's process-wide state stays apart from the other in-process tests.
package proxytest

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	_ "github.com/caddy-headless/caddy-headless/caddymodule"
	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/testcaddy"
)

// backend is an HTTP server on addr that answers with its name.
func backend(t *testing.T, addr, name string) string {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, name)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

// samePortBackends starts one backend on each of 127.0.0.2…127.0.0.(n+1), all on
// one port, as the endpoints of a Service with a numeric port are.
func samePortBackends(t *testing.T, n int) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.2:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		ok := true
		var started []func()
		for i := range n {
			ip := fmt.Sprintf("127.0.0.%d", i+2)
			l, err := net.Listen("tcp", fmt.Sprintf("%s:%d", ip, port))
			if err != nil {
				ok = false
				break
			}
			srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, ip) })}
			go srv.Serve(l)
			started = append(started, func() { srv.Close() })
		}
		for _, stop := range started {
			t.Cleanup(stop)
		}
		if ok {
			return port
		}
		for _, stop := range started {
			stop()
		}
	}
	t.Fatal("no port free on 127.0.0.2-4")
	return 0
}

type proxy struct {
	t     *testing.T
	caddy *testcaddy.Caddy
	url   string
}

// startCaddy runs a site in the in-process Caddy, on ports of its own.
func startCaddy(t *testing.T, site string) *proxy {
	t.Helper()
	c := testcaddy.Start(t, "", site)
	return &proxy{t: t, caddy: c, url: c.URL}
}

// get does one request and returns status and body.
func (p *proxy) get() (int, string) {
	resp, err := p.caddy.Client.Get(p.url)
	if err != nil {
		p.t.Fatalf("GET %s: %v", p.url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// seen does n requests and returns the sorted set of backends that answered,
// with "status N" for each failed request.
func (p *proxy) seen(n int) string {
	p.t.Helper()
	set := map[string]bool{}
	for range n {
		code, body := p.get()
		if code != http.StatusOK {
			body = fmt.Sprintf("status %d", code)
		}
		set[body] = true
	}
	var s []string
	for k := range set {
		s = append(s, k)
	}
	sort.Strings(s)
	return strings.Join(s, " ")
}

// await polls until the set of backends over n requests is want.
func (p *proxy) await(what string, n int, want string) {
	p.t.Helper()
	var got string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if got = p.seen(n); got == want {
			return
		}
	}
	p.t.Fatalf("%s: backends %q, want %q", what, got, want)
}

func TestTrafficFollowsDNS(t *testing.T) {
	port := samePortBackends(t, 3)
	zone := func(ips ...string) string {
		var b strings.Builder
		for _, ip := range ips {
			fmt.Fprintf(&b, "app.bbs.svc.cluster.local. 5 IN A %s\n", ip)
		}
		return b.String()
	}
	dnsSrv := dnstest.Start(t, zone("127.0.0.2", "127.0.0.3"))
	p := startCaddy(t, fmt.Sprintf(`
	reverse_proxy {
		dynamic headless app.bbs:%d {
			resolvers %s
			refresh 100ms
			allow_addresses loopback # the backends listen on 127.0.0.x
			versions ipv4
		}
		lb_policy round_robin
	}`, port, dnsSrv.Addr))

	p.await("initial set", 6, "127.0.0.2 127.0.0.3")

	dnsSrv.MustSet(t, zone("127.0.0.2", "127.0.0.3", "127.0.0.4"))
	p.await("endpoint added", 9, "127.0.0.2 127.0.0.3 127.0.0.4")

	dnsSrv.MustSet(t, zone("127.0.0.3", "127.0.0.4"))
	p.await("endpoint removed", 9, "127.0.0.3 127.0.0.4")

	// All endpoints gone: NXDOMAIN. The source errors, reverse_proxy has no
	// upstream and answers 502/503 instead of dialing a stale address.
	dnsSrv.MustSet(t, "")
	var code int
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if code, _ = p.get(); code >= 500 {
			break
		}
	}
	if code != http.StatusBadGateway && code != http.StatusServiceUnavailable {
		t.Fatalf("after NXDOMAIN: status %d, want 502 or 503", code)
	}

	// Back, then DNS down: the last set keeps serving, every request succeeds.
	dnsSrv.MustSet(t, zone("127.0.0.2", "127.0.0.4"))
	p.await("endpoints back", 6, "127.0.0.2 127.0.0.4")
	dnsSrv.Mute(true)
	queries := dnsSrv.Queries()
	for deadline := time.Now().Add(600 * time.Millisecond); time.Now().Before(deadline); {
		if got := p.seen(4); got != "127.0.0.2 127.0.0.4" {
			t.Fatalf("during the DNS outage: backends %q, want the last set", got)
		}
	}
	if dnsSrv.Queries() == queries {
		t.Fatalf("no DNS query during the outage: the watcher stopped trying")
	}
	dnsSrv.Mute(false)
	dnsSrv.MustSet(t, zone("127.0.0.3"))
	p.await("recovery after the outage", 4, "127.0.0.3")
}

func TestTruncatedSRVAnswerOverTCP(t *testing.T) {
	// Eight endpoints of a named port: SRV records plus glue do not fit a
	// 512-byte UDP reply, so the whole answer must come over TCP.
	var zone strings.Builder
	var want []string
	for i := range 8 {
		name := fmt.Sprintf("pod-%d", i)
		addr := backend(t, "127.0.0.1:0", name)
		_, port, _ := net.SplitHostPort(addr)
		fmt.Fprintf(&zone, "_http._tcp.web.bbs.svc.cluster.local. 5 IN SRV 0 12 %s %s.web.bbs.svc.cluster.local.\n", port, name)
		fmt.Fprintf(&zone, "%s.web.bbs.svc.cluster.local. 5 IN A 127.0.0.1\n", name)
		want = append(want, name)
	}
	dnsSrv := dnstest.Start(t, zone.String())
	// Prove the fixture: a plain 512-byte UDP query comes back truncated.
	q := new(dns.Msg)
	q.SetQuestion("_http._tcp.web.bbs.svc.cluster.local.", dns.TypeSRV)
	if m, err := dns.Exchange(q, dnsSrv.Addr); err != nil || !m.Truncated {
		t.Fatalf("fixture: UDP reply truncated=%v err=%v; want a truncated reply", m != nil && m.Truncated, err)
	}

	p := startCaddy(t, fmt.Sprintf(`
	reverse_proxy {
		dynamic headless web.bbs:http {
			resolvers %s
			edns_buffer_size 512
			allow_addresses loopback # the backends listen on 127.0.0.1
		}
		lb_policy round_robin
	}`, dnsSrv.Addr))
	sort.Strings(want)
	p.await("all eight SRV endpoints", 16, strings.Join(want, " "))
	if dnsSrv.TCPQueries() == 0 {
		t.Fatal("no TCP query: the truncated reply was not asked again over TCP")
	}
}
