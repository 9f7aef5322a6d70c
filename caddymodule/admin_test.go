package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/miekg/dns"

	// The admin endpoint's /metrics route (admin.api.metrics).
	_ "github.com/caddyserver/caddy/v2/modules/metrics"

	"github.com/caddy-headless/caddy-headless/discovery"
	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

// The zones of these tests, as CoreDNS would serve them.
const (
	frontendZone = `
		frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.2
		frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.3
	`
	backendZone = `
		_http._tcp.backend.bbs.svc.cluster.local. 30 IN SRV 0 50 8004 10-1-0-7.backend.bbs.svc.cluster.local.
		10-1-0-7.backend.bbs.svc.cluster.local.   30 IN A   10.1.0.7
	`
	frontend = "frontend.bbs.svc.cluster.local:8001"
	backend  = "backend.bbs.svc.cluster.local:http"
)

// adminCaddy is a Caddy running in this process, with its admin endpoint on a
// loopback port of its own.
type adminCaddy struct {
	t     *testing.T
	admin string // host:port of the admin listener
}

// upstream is one reverse_proxy handler with a headless source.
type upstream struct {
	service   string
	resolvers []string
	extra     map[string]any // more fields of the headless source
}

// startAdminCaddy loads a config whose HTTP servers each hold the given
// handlers, one server per element of sites, and stops it when the test ends.
func startAdminCaddy(t *testing.T, sites ...[]upstream) *adminCaddy {
	t.Helper()
	c := &adminCaddy{t: t, admin: freeLoopbackAddr(t)}
	if err := caddy.Load(c.config(sites...), true); err != nil {
		t.Fatalf("loading Caddy config: %v", err)
	}
	t.Cleanup(func() {
		// Stop the config and close the admin listener (a config with the
		// admin endpoint disabled shuts the running one down).
		if err := caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
	})
	return c
}

func (c *adminCaddy) config(sites ...[]upstream) []byte {
	c.t.Helper()
	servers := map[string]any{}
	for i, site := range sites {
		var routes []any
		for j, u := range site {
			src := map[string]any{"source": "headless", "service": u.service, "resolvers": u.resolvers,
				// Tests drive lookups through POST /headless/refresh.
				"refresh_min": "1h", "dial_timeout": "500ms"}
			for k, v := range u.extra {
				src[k] = v
			}
			routes = append(routes, map[string]any{
				"match":  []any{map[string]any{"path": []string{fmt.Sprintf("/%d/*", j)}}},
				"handle": []any{map[string]any{"handler": "reverse_proxy", "dynamic_upstreams": src}},
			})
		}
		servers[fmt.Sprintf("site%d", i)] = map[string]any{
			"listen":          []string{freeLoopbackAddr(c.t)},
			"routes":          routes,
			"automatic_https": map[string]any{"disable": true},
		}
	}
	cfg, err := json.Marshal(map[string]any{
		"admin":   map[string]any{"listen": c.admin, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps":    map[string]any{"http": map[string]any{"servers": servers}},
	})
	if err != nil {
		c.t.Fatal(err)
	}
	return cfg
}

// reload replaces the running config through the admin API, as `caddy reload` does.
func (c *adminCaddy) reload(sites ...[]upstream) {
	c.t.Helper()
	if code, body := c.do(http.MethodPost, "/load", c.config(sites...)); code != http.StatusOK {
		c.t.Fatalf("POST /load: %d %s", code, body)
	}
}

// do sends a request to the admin endpoint and returns the status and body.
func (c *adminCaddy) do(method, path string, body []byte) (int, []byte) {
	c.t.Helper()
	req, err := http.NewRequest(method, "http://"+c.admin+path, bytes.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := adminClient.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp.StatusCode, out
}

// watchers sends method path and decodes the list of watchers it answers with.
func (c *adminCaddy) watchers(method, path string) []WatcherStatus {
	c.t.Helper()
	code, body := c.do(method, path, nil)
	if code != http.StatusOK {
		c.t.Fatalf("%s %s: %d %s", method, path, code, body)
	}
	var out []WatcherStatus
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields() // the README documents every field: keep the struct the whole truth
	if err := dec.Decode(&out); err != nil {
		c.t.Fatalf("%s %s: decoding %s: %v", method, path, body, err)
	}
	return out
}

// one refreshes the watcher of service and returns its new state.
func (c *adminCaddy) one(service string) WatcherStatus {
	c.t.Helper()
	got := c.watchers(http.MethodPost, "/headless/refresh/"+service)
	if len(got) != 1 {
		c.t.Fatalf("POST /headless/refresh/%s: %d watchers, want 1: %+v", service, len(got), got)
	}
	return got[0]
}

// adminClient bounds every admin request, so a stuck endpoint fails the test.
var adminClient = &http.Client{Timeout: time.Minute}

func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// closedUDPAddr is a loopback port where nothing listens: a DNS server that is down.
func closedUDPAddr(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	return pc.LocalAddr().String()
}

func addresses(eps []EndpointStatus) string {
	var s []string
	for _, e := range eps {
		s = append(s, e.Address)
	}
	return strings.Join(s, " ")
}

func TestAdminHealthyService(t *testing.T) {
	dnsSrv := dnstest.Start(t, frontendZone+backendZone)
	c := startAdminCaddy(t, []upstream{
		{service: frontend, resolvers: []string{dnsSrv.Addr}},
		{service: "backend.bbs.svc.cluster.local.:http", resolvers: []string{dnsSrv.Addr}},
	})

	all := c.watchers(http.MethodPost, "/headless/refresh")
	if len(all) != 2 || all[0].Service != backend || all[1].Service != frontend {
		t.Fatalf("POST /headless/refresh: want %s and %s, sorted; got %+v", backend, frontend, all)
	}
	// The same state, read without refreshing.
	if again := c.watchers(http.MethodGet, "/headless/"); len(again) != 2 || again[1].Lookups != all[1].Lookups {
		t.Fatalf("GET /headless/ after refresh: %+v", again)
	}

	fe := c.watchers(http.MethodGet, "/headless/frontend.bbs.svc.cluster.local")
	if len(fe) != 1 {
		t.Fatalf("GET by FQDN: %+v", fe)
	}
	got := fe[0]
	want := WatcherStatus{
		Service: frontend, Ref: frontend, FQDN: "frontend.bbs.svc.cluster.local.", QName: "frontend.bbs.svc.cluster.local.",
		RecordTypes: []string{"A", "AAAA"}, IPVersions: []string{"ipv4", "ipv6"}, Port: 8001,
		Resolvers: []string{dnsSrv.Addr}, Status: "ok",
		Endpoints: []EndpointStatus{
			{Address: "10.1.0.2:8001", IP: "10.1.0.2", Port: 8001},
			{Address: "10.1.0.3:8001", IP: "10.1.0.3", Port: 8001},
		},
		Outcome: "success", Server: dnsSrv.Addr, TTLSeconds: 5, Users: 1, Source: "dns",
		// Times and counts are checked below.
		ResolvedAt: got.ResolvedAt, NextRefresh: got.NextRefresh, Lookups: got.Lookups,
		AnswerAgeSeconds: got.AnswerAgeSeconds,
	}
	if got.AnswerAgeSeconds < 0 || got.AnswerAgeSeconds > 60 {
		t.Errorf("answer_age_seconds %v: want the seconds since the answer", got.AnswerAgeSeconds)
	}
	if !equalJSON(got, want) {
		t.Errorf("GET /headless/frontend.bbs.svc.cluster.local\n got %s\nwant %s", toJSON(got), toJSON(want))
	}
	if got.ResolvedAt.IsZero() || !got.NextRefresh.After(got.ResolvedAt) || got.Lookups < 1 {
		t.Errorf("resolved_at %s, next_refresh %s, lookups %d: want a success and a later next refresh",
			got.ResolvedAt, got.NextRefresh, got.Lookups)
	}

	// SRV: named port, targets, ports from the records; found by fqdn:port too,
	// with a trailing dot and in any case.
	be := c.watchers(http.MethodGet, "/headless/Backend.bbs.svc.cluster.local.:http")
	if len(be) != 1 || be[0].PortName != "http" || be[0].Port != 0 || be[0].QName != "_http._tcp.backend.bbs.svc.cluster.local." ||
		!slices.Equal(be[0].RecordTypes, []string{"SRV"}) || be[0].Status != "ok" || be[0].TTLSeconds != 30 ||
		len(be[0].Endpoints) != 1 || be[0].Endpoints[0] != (EndpointStatus{Address: "10.1.0.7:8004", IP: "10.1.0.7", Port: 8004,
		Target: "10-1-0-7.backend.bbs.svc.cluster.local."}) {
		t.Errorf("GET /headless/backend…:http: %s", toJSON(be))
	}

	m := c.metrics()
	for series, want := range map[string]float64{
		`caddy_headless_endpoints{service="` + frontend + `"}`:                              2,
		`caddy_headless_endpoints{service="` + backend + `"}`:                               1,
		`caddy_headless_stale{service="` + frontend + `"}`:                                  0,
		`caddy_headless_lookups_total{outcome="servfail",service="` + frontend + `"}`:       0,
		`caddy_headless_truncated_replies_total{service="` + frontend + `"}`:                0,
		`caddy_headless_dropped_records_total{reason="bound",service="` + frontend + `"}`:   0,
		`caddy_headless_dropped_records_total{reason="address",service="` + frontend + `"}`: 0,
		`caddy_headless_lookups_total{outcome="success",service="` + frontend + `"}`:        float64(got.Lookups),
		`caddy_headless_lookup_duration_seconds_count{service="` + frontend + `"}`:          float64(got.Lookups),
		// A every lookup; AAAA on the first and then, this Service being
		// IPv4-only, every 30th.
		`caddy_headless_dns_queries_total{service="` + frontend + `"}`:                       float64(got.Lookups + 1 + got.Lookups/30),
		`caddy_headless_lookup_duration_seconds_bucket{le="+Inf",service="` + backend + `"}`: float64(be[0].Lookups),
	} {
		m.expect(t, series, want)
	}
	if age := m.value(t, `caddy_headless_seconds_since_success{service="`+frontend+`"}`); age < 0 {
		t.Errorf("seconds since success %v", age)
	}
}

func TestAdminUnreachableResolver(t *testing.T) {
	down := closedUDPAddr(t)
	c := startAdminCaddy(t, []upstream{{service: frontend, resolvers: []string{down}}})

	got := c.one(frontend)
	if got.Status != "failing" || got.Outcome != "network_error" || len(got.Endpoints) != 0 || !got.ResolvedAt.IsZero() ||
		got.ErrorAt.IsZero() || got.Stale {
		t.Fatalf("unreachable resolver: %s", toJSON(got))
	}
	// The error says which server failed and what was asked.
	for _, want := range []string{"DNS server " + down, "frontend.bbs.svc.cluster.local", "network_error"} {
		if !strings.Contains(got.Error, want) {
			t.Errorf("error %q lacks %q", got.Error, want)
		}
	}

	m := c.metrics()
	if n := m.value(t, `caddy_headless_lookups_total{outcome="network_error",service="`+frontend+`"}`); n < 1 {
		t.Errorf("network_error lookups %v, want ≥ 1", n)
	}
	m.expect(t, `caddy_headless_lookups_total{outcome="success",service="`+frontend+`"}`, 0)
	m.expect(t, `caddy_headless_endpoints{service="`+frontend+`"}`, 0)
	if m.has(`caddy_headless_seconds_since_success{service="` + frontend + `"}`) {
		t.Errorf("seconds_since_success exported before any answer")
	}
}

func TestAdminNXDomain(t *testing.T) {
	dnsSrv := dnstest.Start(t, "")
	c := startAdminCaddy(t, []upstream{{service: frontend, resolvers: []string{dnsSrv.Addr}}})

	got := c.one(frontend)
	if got.Status != "empty" || got.Outcome != "nxdomain" || got.Error != "" || len(got.Endpoints) != 0 ||
		got.ResolvedAt.IsZero() || got.Server != dnsSrv.Addr || got.TTLSeconds != 5 {
		t.Fatalf("NXDOMAIN: %s", toJSON(got))
	}
	m := c.metrics()
	m.expect(t, `caddy_headless_lookups_total{outcome="nxdomain",service="`+frontend+`"}`, float64(got.Lookups))
	m.expect(t, `caddy_headless_endpoints{service="`+frontend+`"}`, 0)
	m.expect(t, `caddy_headless_stale{service="`+frontend+`"}`, 0)
}

func TestAdminStaleAfterFailure(t *testing.T) {
	dnsSrv := dnstest.Start(t, frontendZone)
	c := startAdminCaddy(t, []upstream{{service: frontend, resolvers: []string{dnsSrv.Addr}}})
	good := c.one(frontend)

	dnsSrv.Fail(dns.RcodeServerFailure)
	got := c.one(frontend)
	if got.Status != "stale" || !got.Stale || got.StaleSince.IsZero() || got.Outcome != "servfail" ||
		addresses(got.Endpoints) != addresses(good.Endpoints) || !got.ResolvedAt.Equal(good.ResolvedAt) ||
		!strings.Contains(got.Error, "SERVFAIL") || got.ErrorAt.Before(got.StaleSince) {
		t.Fatalf("after SERVFAIL: %s", toJSON(got))
	}
	m := c.metrics()
	m.expect(t, `caddy_headless_stale{service="`+frontend+`"}`, 1)
	m.expect(t, `caddy_headless_endpoints{service="`+frontend+`"}`, 2)
	if n := m.value(t, `caddy_headless_lookups_total{outcome="servfail",service="`+frontend+`"}`); n < 1 {
		t.Errorf("servfail lookups %v, want ≥ 1", n)
	}

	dnsSrv.Fail(-1)
	if got = c.one(frontend); got.Status != "ok" || got.Stale || !got.StaleSince.IsZero() || got.Error != "" {
		t.Fatalf("after recovery: %s", toJSON(got))
	}
	c.metrics().expect(t, `caddy_headless_stale{service="`+frontend+`"}`, 0)
}

func TestAdminStaleLimitExpires(t *testing.T) {
	dnsSrv := dnstest.Start(t, frontendZone)
	// The stale bound is counted from the first failure; the watcher looks up
	// again when it passes (on its own) and drops the endpoints. (Not 1ns:
	// that retry would come at once and race the first answer below.)
	c := startAdminCaddy(t, []upstream{{service: frontend, resolvers: []string{dnsSrv.Addr},
		extra: map[string]any{"stale": "500ms"}}})
	c.one(frontend)

	dnsSrv.Fail(dns.RcodeServerFailure)
	if got := c.one(frontend); got.Status != "stale" || got.Expired {
		t.Fatalf("first failure: %s", toJSON(got))
	}
	var got WatcherStatus
	poll.Until(t, "the stale bound to pass", func() bool { got = c.one(frontend); return got.Expired })
	if got.Status != "failing" || len(got.Endpoints) != 0 || got.StaleLimitSeconds != 0.5 ||
		!strings.Contains(got.Error, "SERVFAIL") || got.ErrorAt.Sub(got.StaleSince) < 500*time.Millisecond {
		t.Fatalf("past the stale bound: %s", toJSON(got))
	}
	c.metrics().expect(t, `caddy_headless_endpoints{service="`+frontend+`"}`, 0)
}

// POST /headless/refresh looks up now: a change in DNS shows in its answer
// although the next scheduled lookup is an hour away.
func TestAdminRefresh(t *testing.T) {
	dnsSrv := dnstest.Start(t, frontendZone+backendZone)
	c := startAdminCaddy(t, []upstream{
		{service: frontend, resolvers: []string{dnsSrv.Addr}},
		{service: backend, resolvers: []string{dnsSrv.Addr}},
	})
	before := c.watchers(http.MethodPost, "/headless/refresh")

	dnsSrv.MustSet(t, frontendZone+backendZone+"frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.4\n")
	// One service only…
	got := c.one(frontend)
	if addresses(got.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001 10.1.0.4:8001" || got.Lookups <= before[1].Lookups {
		t.Fatalf("after scale-out and POST refresh/%s: %s", frontend, toJSON(got))
	}
	if be := c.watchers(http.MethodGet, "/headless/"+backend); be[0].Lookups != before[0].Lookups {
		t.Errorf("refreshing %s also looked up %s", frontend, backend)
	}
	// …or all of them.
	dnsSrv.MustSet(t, frontendZone)
	all := c.watchers(http.MethodPost, "/headless/refresh/")
	if len(all) != 2 || all[0].Status != "empty" || all[1].Status != "ok" || all[1].Lookups <= got.Lookups {
		t.Fatalf("POST /headless/refresh/: %s", toJSON(all))
	}
}

func TestAdminMethodsAndUnknownNames(t *testing.T) {
	dnsSrv := dnstest.Start(t, frontendZone)
	c := startAdminCaddy(t, []upstream{{service: frontend, resolvers: []string{dnsSrv.Addr}}})

	for _, tc := range []struct {
		method, path string
		code         int
		allow        string
	}{
		{http.MethodPost, "/headless/", http.StatusMethodNotAllowed, "GET"},
		{http.MethodDelete, "/headless/" + frontend, http.StatusMethodNotAllowed, "GET"},
		{http.MethodPut, "/headless/frontend.bbs.svc.cluster.local", http.StatusMethodNotAllowed, "GET"},
		{http.MethodGet, "/headless/refresh", http.StatusMethodNotAllowed, "POST"},
		{http.MethodGet, "/headless/refresh/" + frontend, http.StatusMethodNotAllowed, "POST"},
		{http.MethodPatch, "/headless/refresh", http.StatusMethodNotAllowed, "POST"},
		{http.MethodGet, "/headless/nosuch.bbs.svc.cluster.local", http.StatusNotFound, ""},
		{http.MethodGet, "/headless/frontend.bbs.svc.cluster.local:8002", http.StatusNotFound, ""},
		{http.MethodPost, "/headless/refresh/nosuch.bbs.svc.cluster.local", http.StatusNotFound, ""},
	} {
		req, _ := http.NewRequest(tc.method, "http://"+c.admin+tc.path, nil)
		resp, err := adminClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var apiErr struct{ Error string }
		err = json.NewDecoder(resp.Body).Decode(&apiErr)
		resp.Body.Close()
		if resp.StatusCode != tc.code || err != nil || apiErr.Error == "" || resp.Header.Get("Allow") != tc.allow {
			t.Errorf("%s %s: %d Allow %q error %q (%v); want %d Allow %q and a JSON error",
				tc.method, tc.path, resp.StatusCode, resp.Header.Get("Allow"), apiErr.Error, err, tc.code, tc.allow)
		}
	}
}

// The routes are Caddy admin routes: its host and origin checks apply.
func TestAdminOriginChecks(t *testing.T) {
	dnsSrv := dnstest.Start(t, frontendZone)
	c := startAdminCaddy(t, []upstream{{service: frontend, resolvers: []string{dnsSrv.Addr}}})
	for name, set := range map[string]func(*http.Request){
		"foreign Host":   func(r *http.Request) { r.Host = "attacker.example" },
		"foreign Origin": func(r *http.Request) { r.Header.Set("Origin", "http://attacker.example") },
	} {
		req, _ := http.NewRequest(http.MethodPost, "http://"+c.admin+"/headless/refresh", nil)
		set(req)
		resp, err := adminClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("%s: %d, want 403", name, resp.StatusCode)
		}
	}
}

// Two sites using the same Service share one watcher (users 2); a reload that
// keeps one of them keeps the watcher running (users 1), and its metrics are
// registered on the new config's registry exactly once.
func TestAdminSharedWatcherAcrossReload(t *testing.T) {
	dnsSrv := dnstest.Start(t, frontendZone)
	site := []upstream{{service: frontend, resolvers: []string{dnsSrv.Addr}}}
	c := startAdminCaddy(t, site, site)

	first := c.one(frontend)
	if first.Users != 2 {
		t.Fatalf("two sites, one Service: users %d, want 2", first.Users)
	}
	lookupsBefore := c.metrics().value(t, `caddy_headless_lookups_total{outcome="success",service="`+frontend+`"}`)

	c.reload(site)
	got := c.watchers(http.MethodGet, "/headless/")
	if len(got) != 1 || got[0].Users != 1 {
		t.Fatalf("after reload to one site: %s", toJSON(got))
	}
	// The same watcher, still warm: no lookup was needed to know the endpoints.
	if got[0].Lookups != first.Lookups || !got[0].ResolvedAt.Equal(first.ResolvedAt) || got[0].Status != "ok" {
		t.Errorf("after reload: lookups %d resolved %s; want the running watcher's %d and %s",
			got[0].Lookups, got[0].ResolvedAt, first.Lookups, first.ResolvedAt)
	}
	c.one(frontend)
	m := c.metrics()
	// Counters continue across the reload rather than start over.
	if n := m.value(t, `caddy_headless_lookups_total{outcome="success",service="`+frontend+`"}`); n != lookupsBefore+1 {
		t.Errorf("success lookups after reload %v, want %v", n, lookupsBefore+1)
	}
	// Reload twice more: still one series per name, users follow the handlers.
	c.reload(site)
	c.reload(site, site)
	m = c.metrics()
	m.expect(t, `caddy_headless_endpoints{service="`+frontend+`"}`, 2)
	if got := c.watchers(http.MethodGet, "/headless/"); got[0].Users != 2 {
		t.Errorf("after reload to two sites: users %d, want 2", got[0].Users)
	}
}

func equalJSON(a, b any) bool { return toJSON(a) == toJSON(b) }

func toJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprintf("%#v", v)
	}
	return string(b)
}

// The README documents every JSON field and every metric (issue 5: stable,
// documented names).
func TestObservabilityDocumented(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "\n## Observability\n")
	if !ok {
		t.Fatal("README.md has no observability section (## Observability)")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	var names []string
	for _, typ := range []reflect.Type{reflect.TypeFor[WatcherStatus](), reflect.TypeFor[EndpointStatus]()} {
		for f := range typ.Fields() {
			tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			names = append(names, tag)
		}
	}
	for _, d := range allDescs {
		name, _, _ := strings.Cut(strings.TrimPrefix(d.String(), `Desc{fqName: "`), `"`)
		names = append(names, name)
	}
	for _, name := range names {
		if !strings.Contains(section, "`"+name+"`") && !strings.Contains(section, "`"+name+"{") {
			t.Errorf("README's observability section does not document %s", name)
		}
	}
}

// A burst of POST /headless/refresh shares the watchers' lookups and starts
// no goroutine per watcher: 100 requests for 200 watchers once made 20,000
// goroutines, one per watcher per request.
func TestAdminRefreshBurstCoalesced(t *testing.T) {
	const nWatchers, nRequests = 200, 100
	dnsSrv := dnstest.Start(t, "")
	var block atomic.Bool
	var held atomic.Int64 // the DNS server's goroutines holding a question: not Caddy's
	release := make(chan struct{})
	dnsSrv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		if block.Load() {
			held.Add(1)
			<-release
			held.Add(-1)
		}
		return false
	})
	var site []upstream
	for i := range nWatchers {
		site = append(site, upstream{service: fmt.Sprintf("app%d.bbs:8080", i), resolvers: []string{dnsSrv.Addr}})
	}
	c := startAdminCaddy(t, site)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		done := 0
		for _, st := range c.watchers(http.MethodGet, "/headless/") {
			if st.Lookups > 0 {
				done++
			}
		}
		if done == nWatchers {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d watchers resolved within 10s", done, nWatchers)
		}
	}
	block.Store(true)
	base := runtime.NumGoroutine()
	codes := make(chan int, nRequests)
	for range nRequests {
		go func() {
			req, _ := http.NewRequest(http.MethodPost, "http://"+c.admin+"/headless/refresh", nil)
			resp, err := adminClient.Do(req)
			if err != nil {
				codes <- 0
				return
			}
			resp.Body.Close()
			codes <- resp.StatusCode
		}()
	}
	// While the DNS server holds every question, the goroutines grow to a
	// plateau: the requests' own (client and server side) plus the refresh's.
	peak, still := 0, 0
	for still < 50 {
		time.Sleep(10 * time.Millisecond)
		if n := runtime.NumGoroutine() - base - int(held.Load()); n > peak {
			peak, still = n, 0
		} else {
			still++
		}
	}
	close(release)
	for range nRequests {
		if code := <-codes; code != http.StatusOK {
			t.Errorf("POST /headless/refresh: %d", code)
		}
	}
	// Each request costs a few goroutines (client, connection, handler);
	// one per watcher per request would be nRequests*nWatchers.
	if limit := 8*nRequests + nWatchers; peak > limit {
		t.Fatalf("%d goroutines for %d concurrent refreshes of %d watchers, want at most %d", peak, nRequests, nWatchers, limit)
	}
	t.Logf("peak %d extra goroutines for %d concurrent refreshes of %d watchers", peak, nRequests, nWatchers)
}

// One refresh of many watchers asks DNS for at most refreshWorkers of them
// at once: while every question is held, no further one is sent until one
// of them is let through. (TestAdminRefreshBurstCoalesced's goroutine
// budget has room for a goroutine per watcher, so it cannot see this.)
func TestAdminRefreshFanOutBounded(t *testing.T) {
	const n = 200
	srv := dnstest.Start(t, "")
	var mu sync.Mutex
	var block bool
	arrived, released, worst := 0, 0, 0
	arrivals := make(chan struct{}, n)
	release := make(chan struct{})
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		mu.Lock()
		if !block {
			mu.Unlock()
			return false
		}
		arrived++
		worst = max(worst, arrived-released)
		mu.Unlock()
		arrivals <- struct{}{}
		<-release
		mu.Lock()
		released++ // before the reply: the next question of this worker comes after
		mu.Unlock()
		return false
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	entries := make([]selected, n)
	for i := range entries {
		svc, err := discovery.ParseService(fmt.Sprintf("app%d.bbs.svc.cluster.local:8080", i), discovery.Defaults{})
		if err != nil {
			t.Fatal(err)
		}
		// IPv4 only: one question per lookup; an hour apart: none but the refresh's.
		w := discovery.New(discovery.Config{Service: svc, IPv4: true, Resolver: &discovery.Resolver{Servers: []string{srv.Addr}},
			RefreshMin: time.Hour}, nil)
		t.Cleanup(w.Stop)
		if _, err := w.RefreshNow(ctx); err != nil {
			t.Fatal(err)
		}
		entries[i] = selected{key: fmt.Sprint(i), watcher: w}
	}
	mu.Lock()
	block = true
	mu.Unlock()
	done := make(chan error, 1)
	go func() { done <- refreshAll(ctx, entries) }()
	for range refreshWorkers {
		<-arrivals
	}
	// Let none through for a moment: an unbounded refresh sends the other
	// questions now (the hook counts them). Not a timed assertion: a bounded
	// one sends none however long this lasts.
	select {
	case <-arrivals:
	case <-time.After(time.Second):
	}
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			defer mu.Unlock()
			if arrived != n {
				t.Fatalf("%d questions for %d watchers, want one each", arrived, n)
			}
			if worst > refreshWorkers {
				t.Fatalf("one refresh held %d DNS questions at once, want at most refreshWorkers (%d)", worst, refreshWorkers)
			}
			return
		case release <- struct{}{}:
		}
	}
}

// D9: POST /headless/refresh during a /load refreshes only the watchers of
// the running config: those a loading config provisioned (which may yet
// fail) ask no DNS until their config starts.
func TestAdminRefreshSkipsPendingWatchers(t *testing.T) {
	dnsSrv := dnstest.Start(t, frontendZone+backendZone)
	c := startAdminCaddy(t, []upstream{{service: frontend, resolvers: []string{dnsSrv.Addr}}})
	// What Provision of a config still loading leaves in the pool: a
	// Watcher made by New, not yet Run.
	pendingDNS := dnstest.Start(t, backendZone)
	svc, err := discovery.ParseService(backend, discovery.Defaults{})
	if err != nil {
		t.Fatal(err)
	}
	key := "pending config " + t.Name()
	val, _, err := watchers.LoadOrNew(key, func() (caddy.Destructor, error) {
		return discovery.New(discovery.Config{Service: svc, IPv4: true, IPv6: true,
			Resolver: &discovery.Resolver{Servers: []string{pendingDNS.Addr}}, RefreshMin: time.Hour}, nil), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { watchers.Delete(key) })
	pending := val.(*discovery.Watcher)

	all := c.watchers(http.MethodPost, "/headless/refresh")
	if len(all) != 1 || all[0].Service != "frontend.bbs.svc.cluster.local:8001" {
		t.Fatalf("POST /headless/refresh: %s; want the running config's watcher only", toJSON(all))
	}
	if code, body := c.do(http.MethodPost, "/headless/refresh/"+backend, nil); code != http.StatusNotFound {
		t.Errorf("POST /headless/refresh/%s of a pending watcher: %d %s, want 404", backend, code, body)
	}
	if n := pendingDNS.Queries(); n != 0 || pending.Running() {
		t.Fatalf("the pending config's watcher asked DNS %d times (running %t)", n, pending.Running())
	}
}

// POST /headless/refresh answers from lookups that started after the
// request (Watcher.RefreshNow's guarantee), also when a refresh of the same
// selection is running: a request that joined it would get the answer of a
// lookup that started before it. Here the running refresh's lookup is held
// by the DNS server with the old zone's answer while the zone changes and a
// second request comes; the second must see the new zone.
func TestAdminRefreshAnswersFromLookupsAfterRequest(t *testing.T) {
	dnsSrv := dnstest.Start(t, frontendZone)
	var block atomic.Bool
	held := make(chan struct{}, 16)
	release := make(chan struct{})
	dnsSrv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		if block.CompareAndSwap(true, false) { // only the first question after block is set
			held <- struct{}{}
			<-release // answered then with the zone as it was when asked
		}
		return false
	})
	c := startAdminCaddy(t, []upstream{{service: frontend, resolvers: []string{dnsSrv.Addr}}})
	if got := c.one(frontend); addresses(got.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001" {
		t.Fatalf("first refresh: %s", toJSON(got))
	}
	// A POST from a goroutine of its own: c.one may not fail the test there.
	post := func(out chan<- string) {
		req, _ := http.NewRequest(http.MethodPost, "http://"+c.admin+"/headless/refresh/"+frontend, nil)
		resp, err := adminClient.Do(req)
		if err != nil {
			out <- err.Error()
			return
		}
		defer resp.Body.Close()
		var got []WatcherStatus
		if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || len(got) != 1 {
			out <- fmt.Sprintf("%d: %v %v", resp.StatusCode, got, err)
			return
		}
		out <- addresses(got[0].Endpoints)
	}

	block.Store(true)
	first, second := make(chan string, 1), make(chan string, 1)
	go post(first)
	<-held // the first request's lookup is in flight, with the old zone's answer
	dnsSrv.MustSet(t, "frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.9")
	go post(second)
	// Both requests are waiting in the handler before the held lookup ends.
	poll.Until(t, "two refresh requests waiting", func() bool { return goroutinesIn("caddymodule.adminHeadless.refresh") == 2 })
	close(release)

	if got := <-first; got != "10.1.0.2:8001 10.1.0.3:8001" {
		t.Errorf("first request: %s; want the old zone its lookup was answered with", got)
	}
	if got := <-second; got != "10.1.0.9:8001" {
		t.Errorf("second request: %s; want the new zone, from a lookup that started after it", got)
	}
}

// goroutinesIn counts the goroutines with fn on their stack.
func goroutinesIn(fn string) int {
	buf := make([]byte, 8<<20)
	n := 0
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, fn+"(") {
			n++
		}
	}
	return n
}
