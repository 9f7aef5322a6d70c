package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	_ "github.com/caddyserver/caddy/v2/modules/logging" // the file log writer

	"github.com/caddy-headless/caddy-headless/discovery"
	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

const appZone = `
app.bbs.svc.cluster.local. 5 IN A 10.1.0.2
app.bbs.svc.cluster.local. 5 IN A 10.1.0.3
`

// newCtx is a context of a real config, with no apps configured: as in a
// running Caddy, a Headless provisioned in it loads the headless app (which
// is not started here, so a watcher starts on its first request). Cancel
// cleans up what was provisioned in it.
func newCtx(t testing.TB) (caddy.Context, context.CancelFunc) {
	t.Helper()
	base, err := caddy.ProvisionContext(&caddy.Config{})
	if err != nil {
		t.Fatalf("a config without apps: %v", err)
	}
	return caddy.NewContext(base)
}

func provision(t *testing.T, h *Headless) {
	t.Helper()
	ctx, cancel := newCtx(t)
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("Provision(%s): %v", h.Service, err)
	}
}

func getUpstreams(t *testing.T, h *Headless) ([]*reverseproxy.Upstream, error) {
	t.Helper()
	r := httptest.NewRequest("GET", "/", nil)
	return h.GetUpstreams(r)
}

func dialsOf(ups []*reverseproxy.Upstream) string {
	var s []string
	for _, u := range ups {
		s = append(s, u.Dial)
	}
	return strings.Join(s, " ")
}

// users reports how many provisioned sources hold the watcher for key.
func users(key string) int {
	n, _ := watchers.References(key)
	return n
}

func TestWatcherSharedByEqualQuestions(t *testing.T) {
	srv := dnstest.Start(t, appZone)
	base := runtime.NumGoroutine()
	a := &Headless{Service: "app.bbs:8080", Resolvers: []string{srv.Addr}, Namespace: "bbs"}
	b := &Headless{Service: "app.bbs.svc.cluster.local:8080", Resolvers: []string{srv.Addr}} // same question, other spelling
	c := &Headless{Service: "app:8081", Resolvers: []string{srv.Addr}, Namespace: "bbs"}     // another port: another watcher
	for _, h := range []*Headless{a, b, c} {
		provision(t, h)
	}
	if a.watcher != b.watcher || a.key != b.key || users(a.key) != 2 {
		t.Fatalf("equal questions got different watchers (users %d)", users(a.key))
	}
	if c.watcher == a.watcher {
		t.Fatal("a different port shares a watcher")
	}
	ups, err := getUpstreams(t, b)
	if err != nil || dialsOf(ups) != "10.1.0.2:8080 10.1.0.3:8080" {
		t.Fatalf("GetUpstreams = [%s], %v", dialsOf(ups), err)
	}

	// The first release keeps the watcher running for the other user.
	if err := a.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if users(b.key) != 1 {
		t.Fatalf("users %d after one Cleanup, want 1", users(b.key))
	}
	srv.MustSet(t, "app.bbs.svc.cluster.local. 5 IN A 10.1.0.9")
	if s, err := b.watcher.RefreshNow(context.Background()); err != nil || len(s.Endpoints) != 1 {
		t.Fatalf("watcher after the first Cleanup: %v, %v", s, err)
	}
	// The last release stops it, and nothing is left running.
	b.Cleanup()
	c.Cleanup()
	if users(b.key) != 0 || users(c.key) != 0 {
		t.Fatal("watchers still referenced after the last Cleanup")
	}
	poll.Goroutines(t, base)
}

// config is a minimal Caddy JSON config with one reverse_proxy per service.
func config(t *testing.T, dnsAddr string, services ...string) []byte {
	t.Helper()
	var routes []any
	for _, s := range services {
		routes = append(routes, map[string]any{"handle": []any{map[string]any{
			"handler": "reverse_proxy",
			"dynamic_upstreams": map[string]any{
				"source": "headless", "service": s, "resolvers": []string{dnsAddr}, "namespace": "bbs",
			},
		}}})
	}
	cfg := map[string]any{
		"admin": map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"srv": map[string]any{
			"listen": []string{"127.0.0.1:0"}, "routes": routes,
		}}}},
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReloadReusesRunningWatcher(t *testing.T) {
	srv := dnstest.Start(t, appZone)
	base := runtime.NumGoroutine()
	if err := caddy.Load(config(t, srv.Addr, "app:8080", "app:8080"), true); err != nil {
		t.Fatal(err)
	}
	var key string
	var w *discovery.Watcher
	watchers.Range(func(k, v any) bool {
		key, w = k.(string), v.(*discovery.Watcher)
		return false
	})
	if w == nil || users(key) != 2 {
		t.Fatalf("after the first load: watcher %v, users %d; want one watcher with 2 users", w, users(key))
	}
	if w.Wait(context.Background(), 5*time.Second) == nil {
		t.Fatal("first resolution did not finish")
	}

	// Reload 10 times (forced, as POST /load with a changed config would be).
	for i := range 10 {
		services := []string{"app:8080"}
		if i%2 == 0 {
			services = append(services, "app.bbs:8080")
		}
		if err := caddy.Load(config(t, srv.Addr, services...), true); err != nil {
			t.Fatal(err)
		}
		var now *discovery.Watcher
		watchers.Range(func(k, v any) bool { now = v.(*discovery.Watcher); return false })
		if now != w {
			t.Fatalf("reload %d started a new watcher: a cold start", i)
		}
		if n := users(key); n != len(services) {
			t.Fatalf("reload %d: %d users, want %d", i, n, len(services))
		}
	}

	// Unloading everything stops the watcher and its goroutine.
	if err := caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true); err != nil {
		t.Fatal(err)
	}
	if users(key) != 0 {
		t.Fatalf("%d users after unloading", users(key))
	}
	poll.Goroutines(t, base)
}

func TestProvisionNeverWaitsOnDNS(t *testing.T) {
	// A resolver that never answers: Provision (and so `caddy validate`) must
	// succeed at once, offline.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	// dial_timeout of an hour: waiting on DNS would be unmistakable.
	cfg := config(t, pc.LocalAddr().String(), "app:8080")
	cfg = bytes.Replace(cfg, []byte(`"service":`), []byte(`"dial_timeout":3600000000000,"service":`), 1)
	if !bytes.Contains(cfg, []byte("dial_timeout")) {
		t.Fatalf("config without a source: %s", cfg)
	}
	var c caddy.Config
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- caddy.Validate(&c) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("validate with an unreachable resolver: %v", err)
		}
	case <-time.After(time.Minute): // not a speed claim: waiting on DNS takes an hour
		t.Fatal("validate waited on DNS")
	}
}

// Validating a config (caddy validate, caddy adapt --validate) provisions it
// but does not start it: no DNS question may leave. Loading it does ask.
func TestValidateAsksNoDNS(t *testing.T) {
	srv := dnstest.Start(t, appZone)
	var services []string
	for i := range 200 {
		services = append(services, fmt.Sprintf("app%d:8080", i))
	}
	cfgJSON := config(t, srv.Addr, services...)
	var c caddy.Config
	if err := json.Unmarshal(cfgJSON, &c); err != nil {
		t.Fatal(err)
	}
	if err := caddy.Validate(&c); err != nil {
		t.Fatal(err)
	}
	// Validate cleans up before it returns: a watcher that had started
	// would have sent its first queries by now, and none can come later.
	if n := srv.Queries(); n != 0 {
		t.Fatalf("validating %d services sent %d DNS queries, want none", len(services), n)
	}
	if n := len(selectWatchers("")); n != 0 {
		t.Fatalf("%d watchers left over after validating", n)
	}
	// The same config, run: its watchers start at once.
	if err := caddy.Load(config(t, srv.Addr, "app:8080"), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })
	for deadline := time.Now().Add(10 * time.Second); srv.Queries() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the loaded config asked no DNS within 10s")
		}
	}
}

func TestGetUpstreamsReturnsFreshCopies(t *testing.T) {
	srv := dnstest.Start(t, appZone)
	h := &Headless{Service: "app.bbs:8080", Resolvers: []string{srv.Addr}}
	provision(t, h)
	defer h.Cleanup()
	first, err := getUpstreams(t, h)
	if err != nil || len(first) != 2 {
		t.Fatalf("GetUpstreams = %d, %v", len(first), err)
	}
	first[0].Dial, first[0].MaxRequests = "mangled:1", 7 // Caddy writes into what it gets
	second, _ := getUpstreams(t, h)
	if dialsOf(second) != "10.1.0.2:8080 10.1.0.3:8080" || second[0].MaxRequests != 0 || second[0] == first[0] {
		t.Fatalf("a caller's writes leaked into the next call: [%s]", dialsOf(second))
	}
}

// allow_cidrs reaches the watcher: only the endpoints in its ranges are
// handed out, a loopback one included since it is allowed by name.
func TestGetUpstreamsAllowCIDRs(t *testing.T) {
	srv := dnstest.Start(t, appZone+"app.bbs.svc.cluster.local. 5 IN A 127.0.0.5\n")
	h := &Headless{Service: "app.bbs:8080", Resolvers: []string{srv.Addr}, AllowCIDRs: []string{"10.1.0.2/32", "127.0.0.0/8"}}
	provision(t, h)
	defer h.Cleanup()
	ups, err := getUpstreams(t, h)
	if err != nil || dialsOf(ups) != "10.1.0.2:8080 127.0.0.5:8080" {
		t.Fatalf("GetUpstreams = [%s], %v; want [10.1.0.2:8080 127.0.0.5:8080]", dialsOf(ups), err)
	}
}

// No request waits on DNS: once the Service is resolved, GetUpstreams sends
// no query, whatever the sampler (the watcher's own refreshes are an hour
// apart here).
func TestGetUpstreamsAsksNoDNS(t *testing.T) {
	srv := dnstest.Start(t, appZone)
	h := &Headless{Service: "app.bbs:8080", Resolvers: []string{srv.Addr},
		RefreshMin: caddy.Duration(time.Hour)}
	provision(t, h)
	defer h.Cleanup()
	if _, err := getUpstreams(t, h); err != nil {
		t.Fatal(err)
	}
	for _, sampler := range []*discovery.Sampler{nil, {Pick: discovery.PickRandom, Size: 1}} {
		h.sampler, h.tries = sampler, "test.tried"
		before := srv.Queries()
		for range 1000 {
			if ups, err := getUpstreams(t, h); err != nil || len(ups) == 0 {
				t.Fatalf("GetUpstreams = %d, %v", len(ups), err)
			}
		}
		if n := srv.Queries() - before; n != 0 {
			t.Fatalf("sampler %v: 1,000 requests sent %d DNS queries", sampler != nil, n)
		}
	}
}

func TestGetUpstreamsErrors(t *testing.T) {
	t.Run("no ready endpoints", func(t *testing.T) {
		srv := dnstest.Start(t, "")
		h := &Headless{Service: "backend.bbs:http", Resolvers: []string{srv.Addr}}
		provision(t, h)
		defer h.Cleanup()
		_, err := getUpstreams(t, h)
		if err == nil || !strings.Contains(err.Error(), "backend.bbs.svc.cluster.local:http") || !strings.Contains(err.Error(), srv.Addr) {
			t.Fatalf("err = %v; want one naming the service and the DNS server", err)
		}
	})
	t.Run("first resolution bounded by dial_timeout", func(t *testing.T) {
		pc, _ := net.ListenPacket("udp", "127.0.0.1:0") // never answers
		defer pc.Close()
		h := &Headless{Service: "app.bbs:8080", Resolvers: []string{pc.LocalAddr().String()}, DialTimeout: caddy.Duration(100 * time.Millisecond)}
		provision(t, h)
		defer h.Cleanup()
		_, err := getUpstreams(t, h)
		if err == nil || !strings.Contains(err.Error(), "app.bbs.svc.cluster.local:8080") || !errors.Is(err, discovery.ErrNotResolved) {
			t.Fatalf("err = %v; want an error naming the service, not resolved yet", err)
		}
	})
}

func TestProvisionRejectsBadConfig(t *testing.T) {
	for _, tc := range []struct {
		h    Headless
		want string
	}{
		{Headless{}, "service is required"},
		{Headless{Service: "app"}, "missing port"},
		{Headless{Service: "app:99999"}, "1-65535"},
		{Headless{Service: "app:8080", Resolvers: []string{"10.0.0.1:abc"}}, "resolvers"},
		{Headless{Service: "app:8080", Namespace: "Bad_NS"}, "namespace"},
		{Headless{Service: "app:8080", RefreshMin: caddy.Duration(time.Second), RefreshMax: caddy.Duration(time.Millisecond)}, "refresh"},
		{Headless{Service: "app:8080", Stale: -1}, "stale"},
		{Headless{Service: "app:8080", EDNSBufferSize: 100}, "edns_buffer_size"},
		// Above 65535: refused, not wrapped around into 512-65535 (70000 is 4464 as a uint16).
		{Headless{Service: "app:8080", EDNSBufferSize: 70000}, "edns_buffer_size must be in 512-65535, got 70000"},
		{Headless{Service: "app:8080", HealthChecks: &HealthChecks{ExpectStatus: 600}}, "expect_status 600"},
		{Headless{Service: "app:8080", Versions: &reverseproxy.IPVersions{IPv4: new(bool)}}, "versions"},
		// Floors, the same as the Caddyfile's (issue 13).
		{Headless{Service: "app:8080", RefreshMin: 1}, "refresh_min 1ns is below the minimum of 100ms"},
		{Headless{Service: "app:8080", RefreshMin: caddy.Duration(time.Second), RefreshMax: 1}, "refresh_max"},
		{Headless{Service: "app:8080", DialTimeout: 1}, "dial_timeout 1ns is below the minimum of 100ms"},
		{Headless{Service: "app:8080", Resolvers: []string{"a b"}}, `resolver "a b"`},
		{Headless{Service: "app:8080", AllowAddresses: []string{"private"}}, "allow_addresses"},
		{Headless{Service: "app:8080", AllowCIDRs: []string{"10.0.0.0"}}, "allow_cidrs"},
	} {
		t.Run(fmt.Sprintf("%+v", tc.want), func(t *testing.T) {
			ctx, cancel := newCtx(t)
			defer cancel()
			h := tc.h
			err := h.Provision(ctx)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Provision(%+v) = %v; want an error mentioning %q", tc.h, err, tc.want)
			}
			if h.watcher != nil {
				t.Fatal("a watcher was started for a rejected config")
			}
		})
	}
}

// A config that fails to load after provisioning a shared watcher must not
// keep it: logging goes back to the config that runs.
func TestFailedLoadGivesLoggingBack(t *testing.T) {
	srv := dnstest.Start(t, appZone)
	dir := t.TempDir()
	withLog := func(file string, services ...string) []byte {
		var c map[string]any
		if err := json.Unmarshal(config(t, srv.Addr, services...), &c); err != nil {
			t.Fatal(err)
		}
		c["logging"] = map[string]any{"logs": map[string]any{"default": map[string]any{
			"level": "DEBUG", "writer": map[string]any{"output": "file", "filename": filepath.Join(dir, file)}}}}
		b, _ := json.Marshal(c)
		return b
	}
	if err := caddy.Load(withLog("a.log", "app:8080"), true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true) })
	// The same question first (it attaches to the running watcher), then a
	// bad one that fails the load.
	if err := caddy.Load(withLog("b.log", "app:8080", "app:99999"), true); err == nil {
		t.Fatal("a config with port 99999 loaded")
	}
	entries := selectWatchers("app.bbs.svc.cluster.local:8080")
	if len(entries) != 1 {
		t.Fatalf("%d watchers", len(entries))
	}
	lookups := func(file string) int {
		b, _ := os.ReadFile(filepath.Join(dir, file))
		return strings.Count(string(b), `"msg":"lookup"`)
	}
	before := lookups("a.log")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := entries[0].watcher.RefreshNow(ctx); err != nil {
		t.Fatal(err)
	}
	if lookups("a.log") == before {
		t.Fatalf("the running config's log got no lookup line after the failed load (b.log has %d)", lookups("b.log"))
	}
}
