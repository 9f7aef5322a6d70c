package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

func init() { caddy.RegisterModule(eventRecorder{}) }

// recorded receives the events the recorder handler is given.
var recorded = make(chan caddy.Event, 100)

// eventRecorder is an events handler module, subscribed in a config like any
// user's handler (exec, a webhook).
type eventRecorder struct{}

func (eventRecorder) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "events.handlers.headless_test_recorder", New: func() caddy.Module { return new(eventRecorder) }}
}

func (eventRecorder) Handle(_ context.Context, e caddy.Event) error {
	recorded <- e
	return nil
}

// nextEvent waits for the next recorded event.
func nextEvent(t *testing.T) caddy.Event {
	t.Helper()
	select {
	case e := <-recorded:
		return e
	case <-time.After(30 * time.Second):
		t.Fatal("no event within 30s")
	}
	return caddy.Event{}
}

// A config's events app, with a subscribed handler, gets healthy and
// unhealthy with the name and data ({"host": ip:port}) of Caddy's own active
// health checker, from our health checks, and endpoints_changed when DNS
// returns another set, once per change.
func TestEventsThroughCaddy(t *testing.T) {
	good, bad := newHealthBackend(t), newHealthBackend(t)
	bad.status.Store(500)
	srv := dnstest.Start(t, srvZone(t, good, bad))
	events := `{"subscriptions":[{"events":["healthy","unhealthy","endpoints_changed"],"handlers":[{"handler":"headless_test_recorder"}]}]}`
	ctx, err := caddy.ProvisionContext(&caddy.Config{AppsRaw: caddy.ModuleMap{"events": json.RawMessage(events)}})
	if err != nil {
		t.Fatal(err)
	}
	src, err := json.Marshal(healthSource(srv, HealthChecks{}))
	if err != nil {
		t.Fatal(err)
	}
	body := fmt.Sprintf(`{"dynamic_upstreams":%s}`, json.RawMessage(`{"source":"headless",`+string(src[1:])))
	mod, err := ctx.LoadModuleByID("http.handlers.reverse_proxy", json.RawMessage(body))
	if err != nil {
		t.Fatalf("%s: %v", body, err)
	}
	rp := mod.(*reverseproxy.Handler)
	h := rp.DynamicUpstreams.(*Headless)
	t.Cleanup(func() { h.Cleanup(); rp.Cleanup() })
	// A running config starts its apps: the events app binds its
	// subscriptions then.
	if err := eventsOf(ctx).Start(); err != nil {
		t.Fatal(err)
	}
	for len(recorded) > 0 {
		<-recorded
	}
	if _, err := h.watcher.RefreshNow(t.Context()); err != nil {
		t.Fatal(err)
	}
	service := "app.bbs.svc.cluster.local:http"
	both := []string{good.dial, bad.dial}
	slices.Sort(both)

	// The first answer, then the bad one's first probe; the good one's
	// first pass is no event (Caddy's upstreams start healthy).
	seen := map[string]caddy.Event{}
	for len(seen) < 2 {
		e := nextEvent(t)
		if _, dup := seen[e.Name()]; dup {
			t.Fatalf("event %s twice: %v", e.Name(), e.Data)
		}
		seen[e.Name()] = e
	}
	if e := seen["endpoints_changed"]; fmt.Sprint(e.Data) != fmt.Sprint(map[string]any{"added": both, "endpoints": 2, "removed": []string{}, "service": service}) {
		t.Fatalf("endpoints_changed data %v", e.Data)
	}
	e := seen["unhealthy"]
	if fmt.Sprint(e.Data) != fmt.Sprint(map[string]any{"host": bad.dial, "service": service}) {
		t.Fatalf("unhealthy data %v, want host %s", e.Data, bad.dial)
	}
	if id := e.Origin().CaddyModule().ID; id != "http.reverse_proxy.upstreams.headless" {
		t.Fatalf("origin %s", id)
	}

	bad.status.Store(200)
	if e := nextEvent(t); e.Name() != "healthy" || e.Data["host"] != bad.dial {
		t.Fatalf("after the bad one recovered: %s %v", e.Name(), e.Data)
	}

	srv.MustSet(t, srvZone(t, good))
	if _, err := h.watcher.RefreshNow(t.Context()); err != nil {
		t.Fatal(err)
	}
	if e := nextEvent(t); e.Name() != "endpoints_changed" || fmt.Sprint(e.Data["removed"]) != fmt.Sprint([]string{bad.dial}) || e.Data["endpoints"] != 1 {
		t.Fatalf("after the bad one left DNS: %s %v", e.Name(), e.Data)
	}
	// The same answer again: no event.
	if _, err := h.watcher.RefreshNow(t.Context()); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-recorded:
		t.Fatalf("event %s %v for an unchanged answer", e.Name(), e.Data)
	case <-time.After(100 * time.Millisecond):
	}
}
