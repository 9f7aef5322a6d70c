package discovery

import (
	"context"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

// backend is a real HTTP server on loopback that answers probes from a
// script, and can go down (connection refused) and come back on its address.
type backend struct {
	t    *testing.T
	addr string
	// reply answers the n-th request (from 0): a status code, or hang (block
	// until the client gives up).
	reply    func(n int) int
	requests atomic.Int64
	inFlight atomic.Int64
	maxIn    atomic.Int64

	mu  sync.Mutex
	srv *http.Server
}

const hang = -1

func newBackend(t *testing.T, reply func(n int) int) *backend {
	t.Helper()
	b := &backend{t: t, reply: reply, addr: "127.0.0.1:0"}
	b.up()
	t.Cleanup(b.down)
	return b
}

func (b *backend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := int(b.requests.Add(1) - 1)
	in := b.inFlight.Add(1)
	defer b.inFlight.Add(-1)
	for {
		m := b.maxIn.Load()
		if in <= m || b.maxIn.CompareAndSwap(m, in) {
			break
		}
	}
	code := b.reply(n)
	if code == hang {
		<-r.Context().Done()
		return
	}
	w.WriteHeader(code)
	w.Write([]byte("status: " + http.StatusText(code)))
}

func (b *backend) up() {
	b.t.Helper()
	ln, err := net.Listen("tcp", b.addr)
	if err != nil {
		b.t.Fatal(err)
	}
	b.mu.Lock()
	b.addr = ln.Addr().String()
	b.srv = &http.Server{Handler: b}
	srv := b.srv
	b.mu.Unlock()
	go srv.Serve(ln)
}

func (b *backend) down() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.srv != nil {
		b.srv.Close()
		b.srv = nil
	}
}

func (b *backend) endpoint() Endpoint { return endpointOf(b.t, b.addr) }

func endpointOf(t *testing.T, addr string) Endpoint {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return Endpoint{IP: ap.Addr(), Port: ap.Port(), Dial: addr}
}

// probeRun is a prober under test with its check events.
type probeRun struct {
	*prober
	events chan CheckEvent
	seq    uint64
}

func startProber(t *testing.T, cfg HealthCheck) *probeRun {
	t.Helper()
	if cfg.Interval == 0 {
		cfg.Interval = 5 * time.Millisecond
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 2 * time.Second
	}
	r := &probeRun{events: make(chan CheckEvent, 1<<16)}
	var log atomic.Pointer[zap.Logger]
	log.Store(zap.NewNop())
	r.prober = newProber(cfg, Service{Ref: "app.bbs:8080", FQDN: "app.bbs.svc.cluster.local.", Port: 8080}, &log)
	r.observe = func(ev CheckEvent) {
		select {
		case r.events <- ev:
		default: // never block the prober (the hook runs under its lock); tests read far fewer
		}
	}
	t.Cleanup(r.stop)
	return r
}

// discover hands the prober a DNS snapshot with these endpoints.
func (r *probeRun) discover(eps ...Endpoint) {
	r.seq++
	r.update(&Snapshot{Endpoints: eps, Seq: r.seq})
}

// next returns the next check event of the endpoint at dial.
func (r *probeRun) next(t *testing.T, dial string) CheckEvent {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case ev := <-r.events:
			if ev.Endpoint.Dial == dial {
				return ev
			}
		case <-timeout:
			t.Fatalf("no health check of %s within 30s", dial)
		}
	}
}

// until returns the first check event of dial that satisfies ok.
func (r *probeRun) until(t *testing.T, dial string, ok func(CheckEvent) bool) CheckEvent {
	t.Helper()
	for {
		if ev := r.next(t, dial); ok(ev) {
			return ev
		}
	}
}

func eligible(v *healthView) string {
	var s []string
	for _, e := range v.Eligible {
		s = append(s, e.Endpoint.Dial)
	}
	return strings.Join(s, " ")
}

// Thresholds count consecutive results only: a pass between fails starts the
// count again, and the other way round.
func TestHealthThresholdsConsecutive(t *testing.T) {
	script := []int{200, 500, 500, 200, 500, 500, 500, 200, 500, 200, 200, 200}
	want := "H H H H H H U U U U H H"
	b := newBackend(t, func(n int) int { return script[min(n, len(script)-1)] })
	p := startProber(t, HealthCheck{Passes: 2, Fails: 3})
	p.discover(b.endpoint())
	var got []string
	for range script {
		ev := p.next(t, b.addr)
		got = append(got, strings.ToUpper(ev.State.String()[:1]))
	}
	if strings.Join(got, " ") != want {
		t.Fatalf("states after each probe:\n got %s\nwant %s (script %v, passes 2, fails 3)", strings.Join(got, " "), want, script)
	}
}

// A new endpoint gets requests only after its first pass; optimistic gives
// them at once.
func TestHealthNewEndpoint(t *testing.T) {
	for _, optimistic := range []bool{false, true} {
		release := make(chan struct{}) // holds the first probe
		b := newBackend(t, func(n int) int {
			if n == 0 {
				<-release
			}
			return 200
		})
		p := startProber(t, HealthCheck{Optimistic: optimistic})
		p.discover(b.endpoint())
		v := p.View()
		if got := eligible(v); (got == b.addr) != optimistic {
			t.Errorf("optimistic=%t: eligible before the first probe = %q", optimistic, got)
		}
		if v.Panic == optimistic {
			t.Errorf("optimistic=%t: panic = %t before the first probe", optimistic, v.Panic)
		}
		if h, _ := p.Health(b.addr); h.State != Unknown {
			t.Errorf("state before the first probe = %s", h.State)
		}
		close(release)
		p.next(t, b.addr)
		if got := eligible(p.View()); got != b.addr {
			t.Errorf("optimistic=%t: eligible after the first pass = %q", optimistic, got)
		}
	}
}

// Real failures: a server that goes down (connection refused), hangs past the
// timeout, answers 500, then comes back.
func TestHealthBackendDownHangErrorBack(t *testing.T) {
	var mode atomic.Int64 // status to answer, or hang
	mode.Store(200)
	b := newBackend(t, func(int) int { return int(mode.Load()) })
	other := newBackend(t, func(int) int { return 200 })
	// The timeout is what a hanging probe costs; the healthy one must never reach it.
	p := startProber(t, HealthCheck{Timeout: time.Second})
	p.discover(b.endpoint(), other.endpoint())
	p.until(t, b.addr, func(ev CheckEvent) bool { return ev.State == Healthy })
	p.until(t, other.addr, func(ev CheckEvent) bool { return ev.State == Healthy })
	both := eligible(p.View())

	cases := []struct {
		name        string
		fail, recov func()
		err         string
	}{
		// A probe may be in flight when it goes, or reuse a kept-alive
		// connection the server closed as it went.
		{"down", b.down, b.up, "refused|reset by peer|EOF|server closed idle connection"},
		{"hangs", func() { mode.Store(hang) }, func() { mode.Store(200) }, "deadline exceeded"},
		{"500", func() { mode.Store(500) }, func() { mode.Store(200) }, "status 500, want 2xx"},
	}
	for _, c := range cases {
		c.fail()
		ev := p.until(t, b.addr, func(ev CheckEvent) bool { return !ev.Passed })
		if ev.State != Unhealthy || ev.Err == nil || !regexp.MustCompile(c.err).MatchString(ev.Err.Error()) {
			t.Fatalf("%s: state %s, error %v; want unhealthy, %q", c.name, ev.State, ev.Err, c.err)
		}
		if got := eligible(p.View()); got != other.addr {
			t.Fatalf("%s: eligible = %q, want only %s", c.name, got, other.addr)
		}
		h, _ := p.Health(b.addr)
		if h.LastCheck.IsZero() || h.LastError == nil {
			t.Fatalf("%s: health = %+v", c.name, h)
		}
		c.recov()
		p.until(t, b.addr, func(ev CheckEvent) bool { return ev.State == Healthy })
		if got := eligible(p.View()); got != both {
			t.Fatalf("%s: back: eligible = %q, want %q", c.name, got, both)
		}
	}
}

// A flapping endpoint with thresholds above one never gets in: each pass is
// followed by a fail before `passes` consecutive ones.
func TestHealthFlapping(t *testing.T) {
	b := newBackend(t, func(n int) int {
		if n < 3 || n%2 == 0 {
			return 503
		}
		return 200
	})
	p := startProber(t, HealthCheck{Passes: 2, Fails: 2})
	p.discover(b.endpoint())
	for i := range 20 {
		ev := p.next(t, b.addr)
		if ev.State != Unhealthy {
			t.Fatalf("probe %d: state %s, want unhealthy throughout the flapping", i, ev.State)
		}
		if p.View().IsEligible(b.addr) {
			t.Fatalf("probe %d: flapping endpoint eligible", i)
		}
	}
}

// With no endpoint healthy the view says panic; the endpoints stay known.
func TestHealthPanic(t *testing.T) {
	var code atomic.Int64
	code.Store(500)
	a := newBackend(t, func(int) int { return int(code.Load()) })
	b := newBackend(t, func(int) int { return int(code.Load()) })
	p := startProber(t, HealthCheck{})
	p.discover(a.endpoint(), b.endpoint())
	p.until(t, a.addr, func(ev CheckEvent) bool { return ev.State == Unhealthy })
	p.until(t, b.addr, func(ev CheckEvent) bool { return ev.State == Unhealthy })
	if v := p.View(); !v.Panic || len(v.Eligible) != 0 || v.Seq != p.seq {
		t.Fatalf("all unhealthy: view %+v", v)
	}
	code.Store(200)
	p.until(t, a.addr, func(ev CheckEvent) bool { return ev.State == Healthy })
	if v := p.View(); v.Panic || !v.IsEligible(a.addr) {
		t.Fatalf("one healthy again: view %+v", v)
	}
	p.discover()
	if v := p.View(); v.Panic || len(v.Eligible) != 0 {
		t.Fatalf("no endpoints: view %+v", v)
	}
}

// An endpoint that leaves DNS is forgotten: when its address comes back it
// starts fresh (Unknown, no traffic until it passes), and a probe that was in
// flight when it left changes nothing.
func TestHealthStateDroppedWhenEndpointLeaves(t *testing.T) {
	var code atomic.Int64
	code.Store(200)
	b := newBackend(t, func(int) int { return int(code.Load()) })
	p := startProber(t, HealthCheck{Interval: time.Hour})
	p.discover(b.endpoint())
	p.until(t, b.addr, func(ev CheckEvent) bool { return ev.State == Healthy })

	p.discover()
	if _, ok := p.Health(b.addr); ok || len(p.Endpoints()) != 0 {
		t.Fatal("state kept for an endpoint that left DNS")
	}
	code.Store(500)
	p.discover(b.endpoint())
	if h, ok := p.Health(b.addr); !ok || h.State != Unknown || !h.LastCheck.IsZero() || p.View().IsEligible(b.addr) {
		t.Fatalf("returning endpoint: %+v, eligible %t; want a fresh unknown one", h, p.View().IsEligible(b.addr))
	}
	// Probed at once although the interval is an hour.
	if ev := p.next(t, b.addr); ev.State != Unhealthy {
		t.Fatalf("first probe of the returning endpoint: %s", ev.State)
	}
}

// The Watcher hands its prober every Snapshot: what DNS names is probed, and
// an endpoint that leaves DNS is forgotten with its state.
func TestWatcherForgetsWhatLeavesDNS(t *testing.T) {
	b := newBackend(t, func(int) int { return 200 })
	e := b.endpoint()
	srv := dnstest.Start(t, "app.bbs.svc.cluster.local. 5 IN A "+e.IP.String())
	w, _ := startWatcher(t, srv, fmt.Sprintf("app:%d", e.Port), func(c *Config) {
		c.IPv6 = false
		c.Addresses = AddressPolicy{Loopback: true} // the backend listens there
		c.Health = &HealthCheck{Interval: time.Hour, Timeout: 2 * time.Second}
	})
	poll.Until(t, "the endpoint probed healthy", func() bool {
		h, ok := w.prober.Health(b.addr)
		return ok && h.State == Healthy
	})
	srv.MustSet(t, "other.bbs.svc.cluster.local. 5 IN A 10.0.0.1")
	if s := refreshNow(t, w); len(s.Endpoints) != 0 {
		t.Fatalf("endpoints [%s] after the Service left DNS", dials(s.Endpoints))
	}
	if h, ok := w.prober.Health(b.addr); ok {
		t.Fatalf("state %+v kept for an endpoint that left DNS", h)
	}
}

// Probes in flight are capped per Service.
func TestHealthMaxInFlight(t *testing.T) {
	release, arrived := make(chan struct{}), make(chan struct{}, 100)
	b := newBackend(t, func(int) int {
		arrived <- struct{}{}
		<-release
		return 200
	})
	// Five endpoints, all probed on the same server through the port override.
	p := startProber(t, HealthCheck{MaxInFlight: 2, Port: b.endpoint().Port})
	var eps []Endpoint
	for i := range 5 {
		eps = append(eps, endpointOf(t, "127.0.0.1:"+string(rune('1'+i))))
	}
	p.discover(eps...)
	<-arrived
	<-arrived
	close(release)
	for _, e := range eps {
		if ev := p.next(t, e.Dial); !ev.Passed {
			t.Fatalf("%s: %v", e.Dial, ev.Err)
		}
	}
	if n := b.maxIn.Load(); n > 2 {
		t.Fatalf("%d probes in flight, cap 2", n)
	}
}

// The HTTP probe: method, URI, headers (Host), port override, expected status
// (code or class) and body.
func TestHealthCheckHTTP(t *testing.T) {
	var got atomic.Pointer[http.Request]
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got.Store(r)
		switch r.URL.Path {
		case "/teapot":
			w.WriteHeader(http.StatusTeapot)
		case "/moved":
			http.Redirect(w, r, "/", http.StatusFound)
			return
		}
		w.Write([]byte(`{"status":"UP"}`))
	}))
	t.Cleanup(srv.Close)
	ep := endpointOf(t, srv.Listener.Addr().String())
	wrongPort := ep
	wrongPort.Port = 1 // nothing listens there: only the override reaches the server

	cases := []struct {
		name string
		cfg  HealthCheck
		ep   Endpoint
		err  string
	}{
		{"default", HealthCheck{}, ep, ""},
		{"uri and class", HealthCheck{URI: "/teapot", Status: 4}, ep, ""},
		{"exact code", HealthCheck{URI: "/teapot", Status: 418}, ep, ""},
		{"wrong code", HealthCheck{URI: "/teapot"}, ep, "status 418, want 2xx"},
		{"redirect not followed", HealthCheck{URI: "/moved"}, ep, "status 302"},
		{"body", HealthCheck{Body: regexp.MustCompile(`"UP"`)}, ep, ""},
		{"body mismatch", HealthCheck{Body: regexp.MustCompile(`DOWN`)}, ep, "body does not match"},
		{"port override", HealthCheck{Port: ep.Port}, wrongPort, ""},
		{"own port", HealthCheck{}, wrongPort, "refused"},
		{"tcp", HealthCheck{TCP: true}, ep, ""},
		{"tcp refused", HealthCheck{TCP: true}, wrongPort, "refused"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := startProber(t, c.cfg)
			err := p.check(c.ep)
			if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)) {
				t.Fatalf("check = %v, want %q", err, c.err)
			}
		})
	}

	p := startProber(t, HealthCheck{Method: "HEAD", URI: "/ready?x=1", Headers: http.Header{"Host": {"app.example"}, "X-Probe": {"1"}}})
	if err := p.check(ep); err != nil {
		t.Fatal(err)
	}
	r := got.Load()
	if r.Method != "HEAD" || r.URL.String() != "/ready?x=1" || r.Host != "app.example" || r.Header.Get("X-Probe") != "1" {
		t.Fatalf("probe request: %s %s Host %s X-Probe %q", r.Method, r.URL, r.Host, r.Header.Get("X-Probe"))
	}
}

// HTTPS probes verify the server against the configured CA and name.
func TestHealthCheckTLS(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(srv.Close)
	ep := endpointOf(t, srv.Listener.Addr().String())
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	cases := []struct {
		name string
		tls  *ProbeTLS
		err  string
	}{
		{"ca and name", &ProbeTLS{RootCAs: ca, ServerName: "example.com"}, ""},
		{"wrong name", &ProbeTLS{RootCAs: ca, ServerName: "other.test"}, "certificate"},
		{"unknown ca", &ProbeTLS{ServerName: "example.com"}, "certificate"},
		{"insecure", &ProbeTLS{InsecureSkipVerify: true}, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := startProber(t, HealthCheck{TLS: c.tls})
			err := p.check(ep)
			if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)) {
				t.Fatalf("check = %v, want %q", err, c.err)
			}
		})
	}
	p := startProber(t, HealthCheck{})
	if err := p.check(ep); err == nil {
		t.Fatalf("plain HTTP to a TLS server: %v", err)
	}
}

// Health checks that probe the same way share a watcher: header order and
// spelled-out defaults do not matter.
func TestWatcherHealthKey(t *testing.T) {
	a := HealthCheck{URI: "/healthz", Headers: http.Header{"A": {"1"}, "B": {"2"}}}
	b := HealthCheck{URI: "/healthz", Headers: http.Header{"B": {"2"}, "A": {"1"}}, Interval: DefaultHealthInterval}
	key := func(h HealthCheck) string { return Config{Health: &h}.Key() }
	if key(a) != key(b) {
		t.Fatalf("equal checks, different keys:\n%s\n%s", key(a), key(b))
	}
	b.Fails = 2
	if key(a) == key(b) {
		t.Fatal("different fails, same key")
	}
}

// Slow start: an endpoint back from failure, or discovered after the first
// ones, ramps up; the first endpoints do not (not at process start).
func TestHealthSlowStartRamp(t *testing.T) {
	var code atomic.Int64
	code.Store(200)
	first := newBackend(t, func(int) int { return int(code.Load()) })
	steady := newBackend(t, func(int) int { return 200 })
	late := newBackend(t, func(int) int { return 200 })
	p := startProber(t, HealthCheck{SlowStart: time.Hour})
	p.discover(first.endpoint(), steady.endpoint())
	p.until(t, first.addr, func(ev CheckEvent) bool { return ev.State == Healthy })
	p.until(t, steady.addr, func(ev CheckEvent) bool { return ev.State == Healthy })
	if v := p.View(); v.ramping() || len(v.Eligible) != 2 || v.Share(v.Eligible[0], time.Now()) != 1 || v.Share(v.Eligible[1], time.Now()) != 1 {
		t.Fatalf("endpoints healthy at start ramp: %+v", v)
	}

	p.discover(first.endpoint(), steady.endpoint(), late.endpoint())
	p.until(t, late.addr, func(ev CheckEvent) bool { return ev.State == Healthy })
	code.Store(500)
	p.until(t, first.addr, func(ev CheckEvent) bool { return ev.State == Unhealthy })
	code.Store(200)
	p.until(t, first.addr, func(ev CheckEvent) bool { return ev.State == Healthy })

	v := p.View()
	if len(v.Eligible) != 3 || !v.ramping() || v.SlowStart != time.Hour {
		t.Fatalf("view: %+v", v)
	}
	for _, e := range v.Eligible {
		h, _ := p.Health(e.Endpoint.Dial)
		ramping := e.Endpoint.Dial != steady.addr
		if !e.RampFrom.Equal(h.RampFrom) || e.RampFrom.IsZero() == ramping {
			t.Errorf("%s: ramp from %v (ramping %t)", e.Endpoint.Dial, e.RampFrom, ramping)
		}
		if !ramping {
			continue
		}
		if got := v.Share(e, h.RampFrom); got != minRampShare {
			t.Errorf("%s: share at the start of the ramp %v, want %v", e.Endpoint.Dial, got, minRampShare)
		}
		if got := v.Share(e, h.RampFrom.Add(30*time.Minute)); got != 0.5 {
			t.Errorf("%s: share halfway %v, want 0.5", e.Endpoint.Dial, got)
		}
		if got := v.Share(e, h.RampFrom.Add(2*time.Hour)); got != 1 {
			t.Errorf("%s: share after the ramp %v", e.Endpoint.Dial, got)
		}
		if !v.RampUntil.After(h.RampFrom) {
			t.Errorf("ramp until %v", v.RampUntil)
		}
	}
}

// D1: DNS swapping between two sets of endpoints that never answer must not
// pile up probes. The queue holds only endpoints DNS names now (never more
// than there are), at most MaxInFlight workers run, a probe in flight ends
// when its endpoint leaves, and once the name is gone nothing is probed.
func TestHealthChurnBoundsQueue(t *testing.T) {
	const inFlight = 2
	p := startProber(t, HealthCheck{MaxInFlight: inFlight, Interval: time.Hour})
	started, ended := make(chan Endpoint, 1<<12), make(chan Endpoint, 1<<12)
	p.run = func(ctx context.Context, e Endpoint) error {
		started <- e
		<-ctx.Done() // an endpoint that accepts and never answers
		ended <- e
		return ctx.Err()
	}
	set := func(third byte) []Endpoint {
		var eps []Endpoint
		for i := range 200 {
			eps = append(eps, endpointOf(t, fmt.Sprintf("127.0.%d.%d:80", third, i+1)))
		}
		return eps
	}
	a, b := set(1), set(2)
	in := func(eps []Endpoint, e Endpoint) bool {
		return slices.ContainsFunc(eps, func(x Endpoint) bool { return x.Dial == e.Dial })
	}
	check := func(current []Endpoint) {
		t.Helper()
		p.mu.Lock()
		defer p.mu.Unlock()
		if len(p.ready) > len(current) || p.workers > inFlight {
			t.Fatalf("%d probes queued for %d endpoints, %d workers (cap %d)", len(p.ready), len(current), p.workers, inFlight)
		}
		for _, st := range p.ready {
			if p.states[st.Endpoint.Dial] != st || !in(current, st.Endpoint) {
				t.Fatalf("a probe of %s is queued, but DNS no longer names it", st.Endpoint.Dial)
			}
		}
	}
	wait := func(ch chan Endpoint, what string) Endpoint {
		t.Helper()
		select {
		case e := <-ch:
			return e
		case <-time.After(30 * time.Second):
			t.Fatalf("no probe %s within 30s", what)
		}
		return Endpoint{}
	}

	p.discover(a...)
	check(a)
	wait(started, "started")
	wait(started, "started")
	p.discover(b...)
	check(b)
	// The two probes of a's endpoints in flight end, and the next ones are of b.
	wait(ended, "ended")
	wait(ended, "ended")
	for range inFlight {
		if e := wait(started, "started"); !in(b, e) {
			t.Fatalf("probing %s after it left DNS", e.Dial)
		}
	}
	for i := range 100 {
		cur := a
		if i%2 == 1 {
			cur = b
		}
		p.discover(cur...)
		check(cur)
	}
	// NXDOMAIN: nothing queued, and what was in flight ends.
	p.discover()
	check(nil)
	p.mu.Lock()
	if len(p.ready) != 0 || len(p.states) != 0 {
		t.Fatalf("after NXDOMAIN: %d queued, %d endpoints", len(p.ready), len(p.states))
	}
	p.mu.Unlock()
	p.stop()
	close(started)
	close(ended)
	// Every probe that started ended (none is left waiting on a departed endpoint).
	n, m := 0, 0
	for range started {
		n++
	}
	for range ended {
		m++
	}
	if n+2*inFlight != m+inFlight { // the test read 2*inFlight starts and inFlight ends
		t.Fatalf("%d probes started, %d ended", n+2*inFlight, m+inFlight)
	}
}

// D2: a probe reads at most maxHealthHeader of response headers, not Go's 10 MiB.
func TestHealthHeaderBound(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Big", strings.Repeat("x", 2*maxHealthHeader))
		w.WriteHeader(200)
	}))
	t.Cleanup(srv.Close)
	p := startProber(t, HealthCheck{})
	err := p.check(endpointOf(t, srv.Listener.Addr().String()))
	if err == nil || !strings.Contains(err.Error(), "header") {
		t.Fatalf("check of an endpoint sending %d bytes of headers = %v, want a header limit error", 2*maxHealthHeader, err)
	}
}

// D1, the way the issue measured it: two sets of 1,000 endpoints that accept
// and never answer, swapped 20 times. The goroutines settle at the workers'
// cap, not at one per probe ever queued (80,756 before the fix).
func TestHealthChurnGoroutinesBounded(t *testing.T) {
	const inFlight = 16
	base := runtime.NumGoroutine()
	p := startProber(t, HealthCheck{MaxInFlight: inFlight, Interval: time.Hour})
	p.run = func(ctx context.Context, e Endpoint) error {
		<-ctx.Done() // never answers
		return ctx.Err()
	}
	sets := [2][]Endpoint{}
	for s := range sets {
		for i := range 1000 {
			sets[s] = append(sets[s], endpointOf(t, fmt.Sprintf("10.%d.%d.%d:80", s+1, i/250, i%250+1)))
		}
	}
	for i := range 20 {
		p.discover(sets[i%2]...)
	}
	// The AfterFunc goroutines of the last set exit once they have queued
	// their endpoint; inFlight workers stay, blocked on endpoints that never
	// answer. (+2: slack for the runtime's own.) Waited for as a whole: on a
	// loaded machine the goroutines can be few while the last set's timers
	// have not all fired yet, and the workers not all started.
	var queued, workers int
	poll.Until(t, fmt.Sprintf("%d workers, at most 1000 queued (the endpoints DNS names), goroutines back to %d", inFlight, base+inFlight+2),
		func() bool {
			p.mu.Lock()
			queued, workers = len(p.ready), p.workers
			p.mu.Unlock()
			return workers == inFlight && queued <= 1000 && runtime.NumGoroutine() <= base+inFlight+2
		},
		func() string {
			return fmt.Sprintf("last seen: %d queued, %d workers, %d goroutines", queued, workers, runtime.NumGoroutine())
		})
}
