package caddymodule

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-headless/caddy-headless/discovery"
	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

// healthBackend is an HTTP server on loopback answering its health checks
// with a settable status.
type healthBackend struct {
	srv    *httptest.Server
	status atomic.Int64
	dial   string
}

func newHealthBackend(t *testing.T) *healthBackend {
	b := &healthBackend{}
	b.status.Store(200)
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(int(b.status.Load()))
	}))
	t.Cleanup(b.srv.Close)
	b.dial = b.srv.Listener.Addr().String()
	return b
}

// srvZone lists the backends as the SRV records of app.bbs:http.
func srvZone(t *testing.T, backends ...*healthBackend) string {
	var z strings.Builder
	for _, b := range backends {
		ap := netip.MustParseAddrPort(b.dial)
		fmt.Fprintf(&z, "_http._tcp.app.bbs.svc.cluster.local. 5 IN SRV 0 50 %d vm.app.bbs.svc.cluster.local.\n", ap.Port())
	}
	z.WriteString("vm.app.bbs.svc.cluster.local. 5 IN A 127.0.0.1\n")
	return z.String()
}

func healthSource(srv *dnstest.Server, hc HealthChecks) *Headless {
	if hc.Interval == 0 {
		hc.Interval = caddy.Duration(discovery.MinHealthInterval)
	}
	// The backends listen on loopback: allowed explicitly.
	return &Headless{Service: "app.bbs:http", Resolvers: []string{srv.Addr}, Versions: ipv4Only(), HealthChecks: &hc,
		AllowAddresses: []string{"loopback"}}
}

// healthOf is what the probes say of the endpoint dialed at dial, as the
// watcher's Status tells it: false while its Snapshot does not name it.
func healthOf(w *discovery.Watcher, dial string) (discovery.EndpointHealth, bool) {
	if h := w.Status().Health; h != nil {
		for _, e := range h.Endpoints {
			if e.Endpoint.Dial == dial {
				return e, true
			}
		}
	}
	return discovery.EndpointHealth{}, false
}

func upstreamsAre(t *testing.T, h *Headless, want string) func() bool {
	return func() bool {
		ups, err := getUpstreams(t, h)
		return err == nil && dialsOf(ups) == want
	}
}

func sortedDials(bs ...*healthBackend) string {
	var s []string
	for _, b := range bs {
		s = append(s, b.dial)
	}
	ups := strings.Join(s, " ")
	if len(s) == 2 && s[0] > s[1] {
		ups = s[1] + " " + s[0]
	}
	return ups
}

// Only endpoints that pass get requests; when none does, all of them do (fail
// open) unless fail_fast is set.
func TestHealthGetUpstreams(t *testing.T) {
	for _, failFast := range []bool{false, true} {
		t.Run(fmt.Sprintf("fail_fast=%t", failFast), func(t *testing.T) {
			good, bad := newHealthBackend(t), newHealthBackend(t)
			bad.status.Store(500)
			srv := dnstest.Start(t, srvZone(t, good, bad))
			h := healthSource(srv, HealthChecks{FailFast: failFast})
			provision(t, h)
			t.Cleanup(func() { h.Cleanup() })

			poll.Until(t, "only the good backend", upstreamsAre(t, h, good.dial))
			poll.Until(t, "the bad backend probed", func() bool {
				st, ok := healthOf(h.watcher, bad.dial)
				return ok && st.State == discovery.Unhealthy
			})
			st := statusOf(h.watcher, 1)
			if st.HealthChecks == nil || st.HealthChecks.Healthy != 1 || st.HealthChecks.Panic || len(st.Endpoints) != 2 {
				t.Fatalf("status: %+v", st)
			}
			for _, e := range st.Endpoints {
				if e.Address == bad.dial && (e.Health != "unhealthy" || !strings.Contains(e.LastError, "status 500") || e.LastCheck.IsZero()) {
					t.Fatalf("bad endpoint status: %+v", e)
				}
				if e.Address == good.dial && (e.Health != "healthy" || e.LastError != "") {
					t.Fatalf("good endpoint status: %+v", e)
				}
			}

			good.status.Store(503)
			poll.Until(t, "panic", func() bool { return h.watcher.Status().Health.Panic })
			ups, err := getUpstreams(t, h)
			switch {
			case failFast && (err == nil || !errors.Is(err, discovery.ErrNoneHealthy) || !strings.Contains(err.Error(), "app.bbs")):
				t.Fatalf("fail fast: %s, %v", dialsOf(ups), err)
			case !failFast && (err != nil || dialsOf(ups) != sortedDials(good, bad)):
				t.Fatalf("fail open: [%s], %v; want both", dialsOf(ups), err)
			}
			if st := statusOf(h.watcher, 1); !st.HealthChecks.Panic || st.HealthChecks.Healthy != 0 {
				t.Fatalf("status in panic: %+v", st)
			}

			bad.status.Store(200)
			poll.Until(t, "the other backend back", upstreamsAre(t, h, bad.dial))
		})
	}
}

// Health state lives with the shared watcher: a reload (a new source with the
// same checks) finds the endpoints already checked; other checks get their
// own watcher; an endpoint that leaves DNS gets no more requests (that the
// watcher forgets its state is discovery's TestWatcherForgetsWhatLeavesDNS).
func TestHealthSharedAcrossReload(t *testing.T) {
	good, bad := newHealthBackend(t), newHealthBackend(t)
	bad.status.Store(500)
	srv := dnstest.Start(t, srvZone(t, good, bad))
	old := healthSource(srv, HealthChecks{Fails: 2})
	provision(t, old)
	poll.Until(t, "only the good backend", upstreamsAre(t, old, good.dial))

	// The new config provisions before the old one is cleaned up.
	reloaded := healthSource(srv, HealthChecks{Fails: 2})
	provision(t, reloaded)
	if reloaded.watcher != old.watcher || users(old.key) != 2 {
		t.Fatalf("reload got another watcher (users %d)", users(old.key))
	}
	if err := old.Cleanup(); err != nil {
		t.Fatal(err)
	}
	// At once, without waiting for a probe: the state was kept.
	if ups, err := getUpstreams(t, reloaded); err != nil || dialsOf(ups) != good.dial {
		t.Fatalf("after reload: [%s], %v", dialsOf(ups), err)
	}

	other := healthSource(srv, HealthChecks{Fails: 3})
	provision(t, other)
	t.Cleanup(func() { other.Cleanup() })
	if other.watcher == reloaded.watcher {
		t.Fatal("different health checks share a watcher")
	}
	plain := &Headless{Service: "app.bbs:http", Resolvers: []string{srv.Addr}, Versions: ipv4Only(), AllowAddresses: []string{"loopback"}}
	provision(t, plain)
	t.Cleanup(func() { plain.Cleanup() })
	if plain.watcher.Status().Health != nil {
		t.Fatal("a source without health checks got a prober")
	}
	if ups, err := getUpstreams(t, plain); err != nil || dialsOf(ups) != sortedDials(good, bad) {
		t.Fatalf("without health checks: [%s], %v; want both", dialsOf(ups), err)
	}

	// The bad endpoint leaves DNS.
	srv.MustSet(t, srvZone(t, good))
	if _, err := reloaded.watcher.RefreshNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ups, err := getUpstreams(t, reloaded); err != nil || dialsOf(ups) != good.dial {
		t.Fatalf("after the bad one left: [%s], %v", dialsOf(ups), err)
	}
	if err := reloaded.Cleanup(); err != nil {
		t.Fatal(err)
	}
}

func TestHealthConfigErrors(t *testing.T) {
	cases := []struct {
		hc  HealthChecks
		err string
	}{
		{HealthChecks{Mode: "udp"}, `mode "udp"`},
		{HealthChecks{Mode: "tcp", URI: "/x"}, "mode tcp only connects"},
		{HealthChecks{URI: "healthz"}, "must start with /"},
		{HealthChecks{ExpectStatus: 42}, "expect_status 42"},
		{HealthChecks{ExpectBody: "("}, "expect_body"},
		{HealthChecks{Port: 70000}, "port 70000"},
		{HealthChecks{TLS: &HealthTLS{CA: "/nonexistent/ca.pem"}}, "health_tls_ca"},
		// Values that validated but made every probe fail (issue 13).
		{HealthChecks{Method: "GE T"}, `method "GE T"`},
		{HealthChecks{Headers: http.Header{"X Bad": {"v"}}}, `"X Bad" is not a valid header name`},
		{HealthChecks{Headers: http.Header{"X-Ok": {"a\r\nInjected: 1"}}}, "X-Ok holds a control character"},
		{HealthChecks{URI: "/%zz"}, `uri "/%zz"`},
		{HealthChecks{URI: "/a b"}, `uri "/a b"`},
		{HealthChecks{MaxInFlight: 100000000}, "max_in_flight 100000000 is above the maximum of 10000"},
		{HealthChecks{Passes: 5000}, "at most 1000"},
		{HealthChecks{Interval: 1}, "interval 1ns is below the minimum of 1s"},
		{HealthChecks{Timeout: 1}, "timeout 1ns is below the minimum of 10ms"},
		{HealthChecks{Interval: -1}, "must not be negative"},
	}
	for _, c := range cases {
		h := &Headless{Service: "app.bbs:8080", Resolvers: []string{"127.0.0.1"}, HealthChecks: &c.hc}
		ctx, cancel := newCtx(t)
		err := h.Provision(ctx)
		cancel()
		if err == nil || !strings.Contains(err.Error(), c.err) || !strings.Contains(err.Error(), "app.bbs:8080") {
			t.Errorf("%+v: %v, want %q", c.hc, err, c.err)
		}
	}
}

// The health metrics: checks by result, transitions, healthy endpoints, panic;
// promlint-clean.
func TestHealthMetrics(t *testing.T) {
	good, bad := newHealthBackend(t), newHealthBackend(t)
	bad.status.Store(500)
	srv := dnstest.Start(t, srvZone(t, good, bad))
	h := healthSource(srv, HealthChecks{Passes: 3})
	ctx := newTestContext(t)
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Cleanup() })
	poll.Until(t, "only the good backend", upstreamsAre(t, h, good.dial))

	gather := func() map[string]float64 {
		families, err := ctx.GetMetricsRegistry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		families = slices.DeleteFunc(families, func(f *dto.MetricFamily) bool {
			return !strings.HasPrefix(f.GetName(), "caddy_headless_")
		})
		if want := len(allDescs) - len(apiDescs); len(families) != want { // api ones: via api only (TestViaAPIProvisionRequestsStatus)
			t.Errorf("%d caddy_headless_ families, want %d", len(families), want)
		}
		problems, err := promlint.NewWithMetricFamilies(families).Lint()
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			t.Errorf("%s: %s", p.Metric, p.Text)
		}
		out := map[string]float64{}
		for _, f := range families {
			for _, m := range f.GetMetric() {
				name := f.GetName()
				for _, l := range m.GetLabel() {
					if l.GetName() != "service" {
						name += "/" + l.GetValue()
					}
				}
				out[name] = m.GetCounter().GetValue() + m.GetGauge().GetValue()
			}
		}
		return out
	}
	// The counters follow the state a moment later (the hook runs after the
	// state is published).
	var m map[string]float64
	poll.Until(t, "metrics of one good, one bad endpoint", func() bool {
		m = gather()
		return m["caddy_headless_healthy_endpoints"] == 1 && m["caddy_headless_health_panic"] == 0 &&
			m["caddy_headless_health_checks_total/fail"] >= 1 && m["caddy_headless_health_checks_total/pass"] >= 1 &&
			m["caddy_headless_health_transitions_total/unhealthy"] == 1 && m["caddy_headless_health_transitions_total/healthy"] == 1
	})
	good.status.Store(500)
	poll.Until(t, "metrics in panic", func() bool {
		m = gather()
		return m["caddy_headless_health_panic"] == 1 && m["caddy_headless_healthy_endpoints"] == 0 &&
			m["caddy_headless_health_transitions_total/unhealthy"] == 2
	})
	if m["caddy_headless_health_transitions_total/unhealthy"] != 2 || m["caddy_headless_health_transitions_total/healthy"] != 1 {
		t.Fatalf("transitions: %v", m)
	}
}

// Every health_* option parses in `dynamic headless`, and survives the JSON
// round trip Caddy puts a module through (an empty health_headers block too).
func TestHealthCaddyfileRoundTrip(t *testing.T) {
	input := `headless app.bbs:http {
		health_uri /ready
		health_headers {
		}
		health_method HEAD
		health_port 9000
		health_status 204
		health_tls_insecure_skip_verify
	}`
	tokens, err := caddyfile.Tokenize([]byte(input), "Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	h := new(Headless)
	if err := h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
		t.Fatal(err)
	}
	want := HealthChecks{URI: "/ready", Method: "HEAD", Port: 9000, ExpectStatus: 204, TLS: &HealthTLS{InsecureSkipVerify: true}}
	if !reflect.DeepEqual(h.HealthChecks, &want) {
		t.Fatalf("parsed %+v, want %+v", h.HealthChecks, want)
	}
	b, _ := json.Marshal(h)
	back := new(Headless)
	if err := json.Unmarshal(b, back); err != nil || !reflect.DeepEqual(h, back) {
		t.Fatalf("JSON round trip: %s, %v", b, err)
	}
}

// Caddy's handler-level active health checks beside the source get a warning:
// they never run on dynamic upstreams.
func TestHandlerHealthWarning(t *testing.T) {
	src := &Headless{Service: "app.bbs:8080"}
	active := &reverseproxy.Handler{HealthChecks: &reverseproxy.HealthChecks{Active: &reverseproxy.ActiveHealthChecks{URI: "/healthz"}}}
	passive := &reverseproxy.Handler{HealthChecks: &reverseproxy.HealthChecks{Passive: &reverseproxy.PassiveHealthChecks{MaxFails: 2}}}
	multi := &reverseproxy.MultiUpstreams{}
	cases := []struct {
		mods []caddy.Module
		ours bool
		want string
	}{
		{[]caddy.Module{active, src}, false, "move the health_* options into the `dynamic headless` block"},
		{[]caddy.Module{active, multi, src}, true, "the headless source's (health_* inside its block) do"},
		{[]caddy.Module{passive, src}, false, ""},
		{[]caddy.Module{src}, false, ""},
	}
	for i, c := range cases {
		if got := handlerHealthWarning(c.mods, c.ours); c.want == "" && got != "" || !strings.Contains(got, c.want) {
			t.Errorf("case %d: %q, want %q", i, got, c.want)
		}
	}
}

// slow_start needs health checks, and is refused under hashing lb_policy choices.
func TestSlowStartConfig(t *testing.T) {
	h := &Headless{Service: "app.bbs:8080", Resolvers: []string{"127.0.0.1"}, SlowStart: caddy.Duration(time.Minute)}
	if _, err := h.config(caddyfileEnv); err == nil || !strings.Contains(err.Error(), "needs health checks") {
		t.Errorf("slow_start without health checks: %v", err)
	}
	for _, c := range []struct {
		policy reverseproxy.Selector
		err    string
	}{
		{&reverseproxy.IPHashSelection{}, "lb_policy ip_hash"},
		{&reverseproxy.CookieHashSelection{}, "lb_policy cookie"},
		{&reverseproxy.RoundRobinSelection{}, ""},
		{nil, ""},
	} {
		rp := &reverseproxy.Handler{LoadBalancing: &reverseproxy.LoadBalancing{SelectionPolicy: c.policy}}
		err := checkSlowStartPolicy([]caddy.Module{rp, h}, h.SlowStart)
		if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)) {
			t.Errorf("%T: %v, want %q", c.policy, err, c.err)
		}
	}
	if err := checkSlowStartPolicy([]caddy.Module{&reverseproxy.Handler{LoadBalancing: &reverseproxy.LoadBalancing{SelectionPolicy: &reverseproxy.IPHashSelection{}}}, h}, 0); err != nil {
		t.Errorf("without slow_start: %v", err)
	}
}

// The watcher key of HTTPS probes is the core's, from the settings as
// values: a CA file's contents part watchers (its path does not), as do the
// server name and insecure_skip_verify; a file without a certificate is
// refused with its name.
func TestHealthTLSKeyFromTheCore(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	srv.Close()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a, sameAsA, other, notPEM := write("a.pem", ca), write("copy.pem", ca), write("b.pem", append(append([]byte(nil), ca...), ca...)), write("x.pem", []byte("not a certificate"))
	key := func(tls HealthTLS) (string, error) {
		h := &Headless{Service: "app.bbs:8080", Resolvers: []string{"127.0.0.1"}, HealthChecks: &HealthChecks{TLS: &tls}}
		ctx, cancel := newCtx(t)
		defer cancel()
		err := h.Provision(ctx)
		if err == nil {
			defer h.Cleanup()
		}
		return h.key, err
	}
	must := func(tls HealthTLS) string {
		t.Helper()
		k, err := key(tls)
		if err != nil {
			t.Fatalf("%+v: %v", tls, err)
		}
		return k
	}
	base := must(HealthTLS{ServerName: "app", CA: a})
	if k := must(HealthTLS{ServerName: "app", CA: sameAsA}); k != base {
		t.Errorf("the same CA at another path: another watcher\n%s\n%s", base, k)
	}
	for _, tc := range []HealthTLS{{ServerName: "app", CA: other}, {ServerName: "other", CA: a}, {ServerName: "app", CA: a, InsecureSkipVerify: true}, {ServerName: "app"}} {
		if k := must(tc); k == base {
			t.Errorf("%+v shares the watcher of %+v", tc, HealthTLS{ServerName: "app", CA: a})
		}
	}
	if _, err := key(HealthTLS{CA: notPEM}); err == nil || !strings.Contains(err.Error(), "health_tls_ca: no PEM certificate in "+notPEM) {
		t.Errorf("a CA file without a certificate: %v", err)
	}
}
