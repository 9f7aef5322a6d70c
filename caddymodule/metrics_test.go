package caddymodule

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/caddy-headless/caddy-headless/discovery"
	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// scrape is one reading of a metrics registry: every sample by its series,
// written as name{label="value",…} with the labels sorted by name.
type scrape map[string]float64

// metrics reads Caddy's /metrics on the admin endpoint.
func (c *adminCaddy) metrics() scrape {
	c.t.Helper()
	code, body := c.do(http.MethodGet, "/metrics", nil)
	if code != http.StatusOK {
		c.t.Fatalf("GET /metrics: %d %s", code, body)
	}
	return parseScrape(c.t, body)
}

func parseScrape(t *testing.T, text []byte) scrape {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(bytes.NewReader(text))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	s := scrape{}
	put := func(name string, labels []*dto.LabelPair, extra string, v float64) {
		var ls []string
		for _, l := range labels {
			ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
		}
		if extra != "" {
			ls = append(ls, extra)
		}
		slices.Sort(ls)
		key := name + "{" + strings.Join(ls, ",") + "}"
		if _, dup := s[key]; dup {
			t.Fatalf("/metrics has %s twice", key)
		}
		s[key] = v
	}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			switch {
			case m.Counter != nil:
				put(name, m.Label, "", m.Counter.GetValue())
			case m.Gauge != nil:
				put(name, m.Label, "", m.Gauge.GetValue())
			case m.Histogram != nil:
				h := m.Histogram
				for _, b := range h.GetBucket() { // +Inf included
					put(name+"_bucket", m.Label, fmt.Sprintf("le=%q", model.SampleValue(b.GetUpperBound()).String()), float64(b.GetCumulativeCount()))
				}
				put(name+"_count", m.Label, "", float64(h.GetSampleCount()))
				put(name+"_sum", m.Label, "", h.GetSampleSum())
			case m.Untyped != nil:
				put(name, m.Label, "", m.Untyped.GetValue())
			}
		}
	}
	return s
}

func (s scrape) has(series string) bool { _, ok := s[series]; return ok }

func (s scrape) value(t *testing.T, series string) float64 {
	t.Helper()
	v, ok := s[series]
	if !ok {
		t.Fatalf("no series %s; have:\n%s", series, s.headless())
	}
	return v
}

func (s scrape) expect(t *testing.T, series string, want float64) {
	t.Helper()
	if got := s.value(t, series); got != want {
		t.Errorf("%s = %v, want %v", series, got, want)
	}
}

// headless lists the caddy_headless_ series, for failure messages.
func (s scrape) headless() string {
	var out []string
	for k, v := range s {
		if strings.HasPrefix(k, "caddy_headless_") {
			out = append(out, fmt.Sprintf("  %s %v", k, v))
		}
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}

// gather reads a registry the way /metrics does.
func gather(t *testing.T, ctx caddy.Context) scrape {
	t.Helper()
	families, err := ctx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatalf("gathering the registry: %v", err)
	}
	var buf bytes.Buffer
	for _, f := range families {
		if _, err := expfmt.MetricFamilyToText(&buf, f); err != nil {
			t.Fatal(err)
		}
	}
	return parseScrape(t, buf.Bytes())
}

var testWatchers int

// startTestWatcher starts a watcher the way Provision does and waits for its first lookup, the only one in the next hour.
func startTestWatcher(t *testing.T, srv *dnstest.Server, ref string) (string, *discovery.Watcher) {
	t.Helper()
	svc, err := discovery.ParseService(ref, discovery.Defaults{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := discovery.Config{Service: svc, IPv4: true, Resolver: &discovery.Resolver{Servers: []string{srv.Addr}},
		RefreshMin: time.Hour, RefreshMax: time.Hour}
	// A key of its own, so watchers of the same Service stay apart.
	testWatchers++
	key := fmt.Sprintf("%s #%d %s", t.Name(), testWatchers, cfg.Key())
	w := discovery.New(cfg, nil)
	w.Run()
	t.Cleanup(w.Stop)
	if w.Wait(context.Background(), 10*time.Second) == nil {
		t.Fatalf("%s: no answer from %s", ref, srv.Addr)
	}
	return key, w
}

func newTestContext(t *testing.T) caddy.Context {
	ctx, cancel := newCtx(t)
	t.Cleanup(cancel)
	return ctx
}

// Every Headless of a config registers on the same registry: the first
// registers the collector, the others join it, and nothing is exported twice
// even when two watchers ask for the same Service.
func TestMetricsOneCollectorPerRegistry(t *testing.T) {
	srv := dnstest.Start(t, frontendZone)
	ctx := newTestContext(t)
	k1, w1 := startTestWatcher(t, srv, frontend)
	// The same Service through another watcher (say, other resolver settings).
	k2, w2 := startTestWatcher(t, srv, frontend)
	for _, r := range []struct {
		key string
		w   *discovery.Watcher
	}{{k1, w1}, {k2, w2}, {k1, w1}} {
		if err := registerMetrics(ctx, r.key, r.w); err != nil {
			t.Fatalf("registerMetrics: %v", err)
		}
	}
	s := gather(t, ctx)
	// Counters add up; gauges show the worse watcher.
	s.expect(t, `caddy_headless_lookups_total{outcome="success",service="`+frontend+`"}`, 2)
	s.expect(t, `caddy_headless_lookup_duration_seconds_count{service="`+frontend+`"}`, 2)
	s.expect(t, `caddy_headless_endpoints{service="`+frontend+`"}`, 2)

	// Another config, another registry: exported there too, from the same counters.
	other := newTestContext(t)
	if err := registerMetrics(other, k1, w1); err != nil {
		t.Fatal(err)
	}
	gather(t, other).expect(t, `caddy_headless_lookups_total{outcome="success",service="`+frontend+`"}`, 1)
}

// One config exports at most maxServiceLabels service labels; the watchers
// beyond share service="_other", so a huge config cannot blow up the series.
func TestMetricsServiceLabelsBounded(t *testing.T) {
	srv := dnstest.Start(t, frontendZone+backendZone)
	ctx := newTestContext(t)
	c := newServiceCollector()
	c.limit = 2
	if err := ctx.GetMetricsRegistry().Register(c); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{frontend, backend, "nosuch.bbs.svc.cluster.local:80", "gone.bbs.svc.cluster.local:80"} {
		key, w := startTestWatcher(t, srv, ref)
		if err := registerMetrics(ctx, key, w); err != nil {
			t.Fatal(err)
		}
	}
	s := gather(t, ctx)
	var services []string
	for k := range s {
		if name, labels, ok := strings.Cut(k, "{"); ok && name == "caddy_headless_endpoints" {
			services = append(services, labels)
		}
	}
	slices.Sort(services)
	want := []string{`service="_other"}`, `service="` + backend + `"}`, `service="` + frontend + `"}`}
	if !slices.Equal(services, want) {
		t.Fatalf("service labels %v, want %v", services, want)
	}
	s.expect(t, `caddy_headless_lookups_total{outcome="nxdomain",service="_other"}`, 2)
	s.expect(t, `caddy_headless_endpoints{service="_other"}`, 0)
}

// The metric names follow Prometheus conventions (promlint).
func TestMetricsLint(t *testing.T) {
	srv := dnstest.Start(t, frontendZone)
	key, w := startTestWatcher(t, srv, frontend)
	ctx := newTestContext(t)
	if err := registerMetrics(ctx, key, w); err != nil {
		t.Fatal(err)
	}
	families, err := ctx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	families = slices.DeleteFunc(families, func(f *dto.MetricFamily) bool {
		return !strings.HasPrefix(f.GetName(), "caddy_headless_")
	})
	// The health check metrics only come with health checks (TestHealthMetrics).
	if want := len(allDescs) - len(healthDescs) - len(apiDescs); len(families) != want { // api ones: TestViaAPIMetrics
		t.Errorf("%d caddy_headless_ families, want %d", len(families), want)
	}
	problems, err := promlint.NewWithMetricFamilies(families).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
}

// dropped_records_total tells its reasons apart: an endpoint address the
// policy refuses counts as reason="address", not as an exceeded bound.
func TestMetricsDroppedRecordsByReason(t *testing.T) {
	const ref = "mixed.bbs.svc.cluster.local:80"
	srv := dnstest.Start(t, "mixed.bbs.svc.cluster.local. 5 IN A 10.1.0.2\nmixed.bbs.svc.cluster.local. 5 IN A 127.0.0.1")
	key, w := startTestWatcher(t, srv, ref)
	ctx := newTestContext(t)
	if err := registerMetrics(ctx, key, w); err != nil {
		t.Fatal(err)
	}
	s := gather(t, ctx)
	s.expect(t, `caddy_headless_dropped_records_total{reason="address",service="`+ref+`"}`, 1)
	s.expect(t, `caddy_headless_dropped_records_total{reason="bound",service="`+ref+`"}`, 0)
}

// A TTL that counts down between two lookups of the same answer is a cache
// in front of the cluster's DNS: the gauge then says how old an answer may be.
func TestMetricsDNSCacheMaxAge(t *testing.T) {
	zone := func(ttl int) string {
		return fmt.Sprintf("frontend.bbs.svc.cluster.local. %d IN A 10.1.0.2\n", ttl)
	}
	srv := dnstest.Start(t, zone(30))
	ctx := newTestContext(t)
	key, w := startTestWatcher(t, srv, frontend)
	if err := registerMetrics(ctx, key, w); err != nil {
		t.Fatal(err)
	}
	series := `caddy_headless_dns_cache_max_age_seconds{service="` + frontend + `"}`
	refresh := func() {
		t.Helper()
		rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := w.RefreshNow(rctx); err != nil {
			t.Fatal(err)
		}
	}
	refresh() // 30 again: a fresh server
	gather(t, ctx).expect(t, series, 0)
	srv.MustSet(t, zone(29))
	refresh()
	gather(t, ctx).expect(t, series, 30)
	gather(t, ctx).expect(t, `caddy_headless_endpoints_set_aside{service="`+frontend+`"}`, 0)
}
