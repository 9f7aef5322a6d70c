package discovery

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Nothing in Kubernetes probes an endpoint entered by hand (a VM behind a
// Service without a selector): its EndpointSlice stays ready and DNS keeps
// handing it out after it died. A prober checks every endpoint a Watcher
// discovers, on its own jittered timer, and tells requests which ones pass.
// It lives inside the Watcher, so its state survives config reloads and is
// shared by every handler asking the same question.

// HealthCheck configures active health checks; Config.Key tells apart the
// ones that probe differently.
type HealthCheck struct {
	// TCP only connects to the endpoint instead of sending an HTTP request.
	TCP bool
	// Method, URI and Headers make the HTTP request (GET, "/", none by default).
	// A Host header sets the request's Host.
	Method  string
	URI     string
	Headers http.Header
	// Port, if set, is probed instead of the endpoint's own port.
	Port uint16
	// Status is the expected status code; a single digit means a class
	// (2 means 2xx). 0 means 2xx.
	Status int
	// Body, if set, must match the response body (its first 64 KiB).
	Body *regexp.Regexp
	// Interval between two probes of one endpoint; Jitter shortens each wait
	// by up to that much (default Interval/10). Timeout bounds one probe.
	Interval, Jitter, Timeout time.Duration
	// Passes and Fails are the consecutive results that make an endpoint
	// healthy or unhealthy (default 1 each).
	Passes, Fails int
	// MaxInFlight caps the probes running at once for this Service (default 16).
	MaxInFlight int
	// Optimistic sends requests to a new endpoint before its first probe
	// passes; by default it gets none until then.
	Optimistic bool
	// FailFast makes requests fail when no endpoint is healthy; by default
	// they go to every discovered endpoint (fail open, "panic mode").
	FailFast bool
	// SlowStart, if set, ramps a newly healthy endpoint's share of requests
	// up over this long (see healthView.Share).
	SlowStart time.Duration
	// TLS, if set, makes the HTTP probes HTTPS with these settings.
	TLS *ProbeTLS
}

// ProbeTLS are the settings of HTTPS probes, as values: the prober builds
// the tls.Config from them (clientConfig) and Config.Key tells them apart,
// so no caller composes either.
type ProbeTLS struct {
	// ServerName is sent as SNI, and the certificate must be valid for it.
	ServerName string
	// InsecureSkipVerify accepts any certificate.
	InsecureSkipVerify bool
	// RootCAs is PEM of the CA certificates to verify with; empty means the
	// system's roots. (The configuration layer reads the file; the core
	// reads none.)
	RootCAs []byte
}

// ErrNoPEMCertificate is Validate's error for RootCAs that hold no PEM
// certificate.
var ErrNoPEMCertificate = errors.New("no PEM certificate")

// check reports RootCAs that hold no certificate.
func (t *ProbeTLS) check() error {
	if t == nil || len(t.RootCAs) == 0 {
		return nil
	}
	if !x509.NewCertPool().AppendCertsFromPEM(t.RootCAs) {
		return ErrNoPEMCertificate
	}
	return nil
}

// clientConfig is the tls.Config of the probes; nil for plain HTTP.
func (t *ProbeTLS) clientConfig() *tls.Config {
	if t == nil {
		return nil
	}
	c := &tls.Config{ServerName: t.ServerName, InsecureSkipVerify: t.InsecureSkipVerify, MinVersion: tls.VersionTLS12}
	if len(t.RootCAs) > 0 {
		c.RootCAs = x509.NewCertPool()
		c.RootCAs.AppendCertsFromPEM(t.RootCAs)
	}
	return c
}

// key describes t for Config.Key: every setting, the CAs by their digest.
func (t *ProbeTLS) key() string {
	if t == nil {
		return "off"
	}
	ca := "system"
	if len(t.RootCAs) > 0 {
		ca = fmt.Sprintf("%x", sha256.Sum256(t.RootCAs))
	}
	return fmt.Sprintf("sni=%q insecure=%t ca=%s", t.ServerName, t.InsecureSkipVerify, ca)
}

// CheckEvent describes one probe of one endpoint.
type CheckEvent struct {
	Service  Service
	Endpoint Endpoint
	Passed   bool
	Err      error
	// State after the probe, and Changed if the probe moved it.
	State   HealthState
	Changed bool
}

// HealthState is what the probes say about an endpoint.
type HealthState uint8

// Health states. An endpoint is Unknown until its first probe finishes.
const (
	Unknown HealthState = iota
	Healthy
	Unhealthy
)

func (s HealthState) String() string {
	switch s {
	case Healthy:
		return "healthy"
	case Unhealthy:
		return "unhealthy"
	}
	return "unknown"
}

// Defaults of HealthCheck, as for Caddy's own active health checks.
const (
	DefaultHealthInterval    = 30 * time.Second
	DefaultHealthTimeout     = 5 * time.Second
	DefaultHealthMaxInFlight = 16
	maxHealthBody            = 64 << 10
	// maxHealthHeader bounds a probe response's headers: Go's default is
	// 10 MiB, and an endpoint DNS names may send that much to every probe.
	maxHealthHeader = 32 << 10
)

// withDefaults fills the zero fields.
func (c HealthCheck) withDefaults() HealthCheck {
	if c.Method == "" {
		c.Method = http.MethodGet
	}
	if c.URI == "" {
		c.URI = "/"
	}
	if c.Interval <= 0 {
		c.Interval = DefaultHealthInterval
	}
	if c.Jitter <= 0 {
		c.Jitter = c.Interval / 10
	}
	c.Jitter = min(c.Jitter, c.Interval)
	if c.Timeout <= 0 {
		c.Timeout = DefaultHealthTimeout
	}
	c.Passes, c.Fails = max(c.Passes, 1), max(c.Fails, 1)
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = DefaultHealthMaxInFlight
	}
	return c
}

// EndpointHealth is the probes' view of one endpoint.
type EndpointHealth struct {
	Endpoint Endpoint
	State    HealthState
	// Passes and Fails count the consecutive results so far.
	Passes, Fails int
	// LastCheck is when the last probe finished; LastError its error, nil if it passed.
	LastCheck time.Time
	LastError error
	// Since is when State last changed (or the endpoint was discovered).
	Since time.Time
	// RampFrom is when the endpoint's slow start began; zero if it gets its
	// full share (no slow_start, or healthy since the prober started).
	RampFrom time.Time
}

// healthView is an immutable summary of the probes, published whenever a
// state changes or DNS answers.
type healthView struct {
	// Seq is the Snapshot.Seq the view was computed for.
	Seq uint64
	// Eligible are the endpoints requests may go to, sorted, each with its
	// slow start: the healthy ones (and Unknown ones when optimistic). Empty
	// when none is.
	Eligible []eligibleEndpoint
	// endpoints are the Endpoints of Eligible alone: what a request is
	// handed when no slow start thins them, without a copy per request.
	endpoints []Endpoint
	eligible  map[string]bool
	// Panic is set while endpoints are discovered but none is eligible.
	Panic bool
	// FailFast is the configured behaviour in panic.
	FailFast bool
	// SlowStart is the length of a ramp.
	SlowStart time.Duration
	// RampUntil is when the last ramp ends; zero when no endpoint is ramping.
	RampUntil time.Time
}

// eligibleEndpoint is an endpoint requests may go to, with its slow start.
type eligibleEndpoint struct {
	Endpoint Endpoint
	// RampFrom is when its slow start began; zero when it gets its full
	// share (see EndpointHealth.RampFrom).
	RampFrom time.Time
}

// add makes e eligible, its share ramping up from rampFrom (zero: its full
// share at once). v.eligible must be made and v.SlowStart set.
func (v *healthView) add(e Endpoint, rampFrom time.Time) {
	v.Eligible = append(v.Eligible, eligibleEndpoint{Endpoint: e, RampFrom: rampFrom})
	v.endpoints = append(v.endpoints, e)
	v.eligible[e.Dial] = true
	if !rampFrom.IsZero() {
		if end := rampFrom.Add(v.SlowStart); end.After(v.RampUntil) {
			v.RampUntil = end
		}
	}
}

// ramping reports whether an eligible endpoint is in its slow start (or was,
// until RampUntil).
func (v *healthView) ramping() bool { return !v.RampUntil.IsZero() }

// minRampShare is the share a ramping endpoint starts with, so it is tried
// at once (Envoy's min_weight_percent is 10% too).
const minRampShare = 0.1

// Share is how much of its full share of requests the eligible endpoint e
// gets at now: 1 outside a slow start, else growing linearly from 0.1 to 1.
func (v *healthView) Share(e eligibleEndpoint, now time.Time) float64 {
	if e.RampFrom.IsZero() {
		return 1
	}
	f := float64(now.Sub(e.RampFrom)) / float64(v.SlowStart)
	return min(max(f, minRampShare), 1)
}

// IsEligible reports whether requests may go to the endpoint dialed at dial.
func (v *healthView) IsEligible(dial string) bool { return v.eligible[dial] }

// prober runs the health checks of one Watcher's endpoints.
type prober struct {
	cfg    HealthCheck
	svc    Service
	logger *atomic.Pointer[zap.Logger]
	client *http.Client
	dialer net.Dialer

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	view atomic.Pointer[healthView]

	mu      sync.Mutex
	seq     uint64
	members []Endpoint // the discovered endpoints, sorted
	states  map[string]*probeState
	panic   bool
	stopped bool
	started bool // seen a snapshot: endpoints discovered later ramp up
	// ready are the endpoints due for a probe, oldest first, each at most
	// once and each still discovered: update removes those that left DNS, so
	// the queue never holds more than the current endpoints whatever DNS
	// does. workers (at most cfg.MaxInFlight) take from it.
	ready   []*probeState
	workers int

	// run checks one endpoint: check, or a test's stand-in.
	run func(context.Context, Endpoint) error

	stats   *stats                                // the Watcher's; nil in tests of the prober alone
	observe func(CheckEvent)                      // tests: called after every probe, under mu
	changed func(ev CheckEvent, prev HealthState) // the Watcher's events; after a change, not under mu
}

// probeState is one endpoint's state; a pointer that identifies the endpoint's
// presence: a probe finishing for a removed (or re-added) endpoint is ignored.
type probeState struct {
	EndpointHealth
	timer  *time.Timer
	late   bool // discovered after the prober's first endpoints: slow start applies
	queued bool // in prober.ready
	// ctx ends when the endpoint leaves DNS: a probe in flight stops then.
	ctx    context.Context
	cancel context.CancelFunc
}

func newProber(cfg HealthCheck, svc Service, logger *atomic.Pointer[zap.Logger]) *prober {
	cfg = cfg.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	p := &prober{
		cfg: cfg, svc: svc, logger: logger,
		ctx:    ctx,
		cancel: cancel,
		states: map[string]*probeState{},
	}
	p.dialer.Timeout = cfg.Timeout
	if !cfg.TCP {
		p.client = &http.Client{
			Transport: &http.Transport{
				DialContext:         p.dialer.DialContext,
				TLSClientConfig:     cfg.TLS.clientConfig(),
				TLSHandshakeTimeout: cfg.Timeout,
				DisableKeepAlives:   true, // every probe connects, as a new request would
				DisableCompression:  true,
				// Headers bounded here, the body in check.
				MaxResponseHeaderBytes: maxHealthHeader,
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
			Timeout:       cfg.Timeout,
		}
	}
	p.run = p.checkCtx
	p.view.Store(&healthView{FailFast: cfg.FailFast})
	return p
}

// View returns the current summary; never nil.
func (p *prober) View() *healthView { return p.view.Load() }

// Endpoints returns the state of every discovered endpoint, sorted.
func (p *prober) Endpoints() []EndpointHealth {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]EndpointHealth, 0, len(p.members))
	for _, e := range p.members {
		out = append(out, p.states[e.Dial].EndpointHealth)
	}
	return out
}

// update follows a new snapshot: endpoints that appeared are probed at once,
// those that left DNS are forgotten (a reused IP starts fresh).
func (p *prober) update(s *Snapshot) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return
	}
	now := time.Now()
	keep := make(map[string]bool, len(s.Endpoints))
	for _, e := range s.Endpoints {
		keep[e.Dial] = true
		if _, ok := p.states[e.Dial]; ok {
			continue
		}
		st := &probeState{EndpointHealth: EndpointHealth{Endpoint: e, Since: now}, late: p.started}
		st.ctx, st.cancel = context.WithCancel(p.ctx)
		p.states[e.Dial] = st
		st.timer = time.AfterFunc(0, func() { p.enqueue(st) })
	}
	gone := false
	for dial, st := range p.states {
		if !keep[dial] {
			st.timer.Stop()
			st.cancel() // a probe of it in flight ends now
			delete(p.states, dial)
			gone = gone || st.queued
		}
	}
	if gone {
		// Under DNS churn endpoints come and go faster than they are probed:
		// a probe waiting for one that left would run for nothing (and send
		// health_headers to an address DNS no longer names).
		p.ready = slices.DeleteFunc(p.ready, func(st *probeState) bool { return p.states[st.Endpoint.Dial] != st })
	}
	p.members = s.Endpoints
	p.seq = s.Seq
	p.started = p.started || len(s.Endpoints) > 0
	p.publishLocked()
}

// publishLocked computes and stores the view; p.mu is held.
func (p *prober) publishLocked() {
	v := &healthView{Seq: p.seq, FailFast: p.cfg.FailFast, SlowStart: p.cfg.SlowStart, eligible: make(map[string]bool, len(p.members))}
	unhealthy, unknown := 0, 0
	for _, e := range p.members {
		st := p.states[e.Dial]
		if st.State == Healthy || st.State == Unknown && p.cfg.Optimistic {
			v.add(e, st.RampFrom)
		}
		switch st.State {
		case Unhealthy:
			unhealthy++
		case Unknown:
			unknown++
		}
	}
	// Requests are handed endpoints without a copy: no spare capacity that
	// a caller's append could write into.
	v.Eligible, v.endpoints = slices.Clip(v.Eligible), slices.Clip(v.endpoints)
	v.Panic = len(v.Eligible) == 0 && len(p.members) > 0
	p.view.Store(v)
	// Log entering panic only once every endpoint failed: at start they are
	// Unknown for the blink of their first probe.
	switch log := p.logger.Load(); {
	case v.Panic && !p.panic && unhealthy > 0 && unknown == 0:
		consequence := "failing open: sending requests to all discovered endpoints"
		if p.cfg.FailFast {
			consequence = "failing fast: requests will fail until one passes"
		}
		log.Warn("no endpoint passes health checks; "+consequence,
			zap.String("service", p.svc.String()), zap.Int("endpoints", len(p.members)), zap.Int("unhealthy", unhealthy))
		p.panic = true
	case !v.Panic && p.panic:
		log.Info("endpoints pass health checks again", zap.String("service", p.svc.String()),
			zap.Int("healthy", len(v.Eligible)), zap.Int("endpoints", len(p.members)))
		p.panic = false
	case len(p.members) == 0:
		p.panic = false
	}
}

// enqueue puts st in the queue, when its timer fires, and starts a worker
// if fewer than MaxInFlight run.
func (p *prober) enqueue(st *probeState) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped || st.queued || p.states[st.Endpoint.Dial] != st {
		return // stopped, or the endpoint left DNS
	}
	st.queued = true
	p.ready = append(p.ready, st)
	if p.workers < p.cfg.MaxInFlight {
		p.workers++
		// Add under the lock that stop takes before it waits: no worker
		// starts after stop began waiting.
		p.wg.Add(1)
		go p.work()
	}
}

// work probes queued endpoints until the queue is empty.
func (p *prober) work() {
	defer p.wg.Done()
	for {
		p.mu.Lock()
		if p.stopped || len(p.ready) == 0 {
			p.workers--
			p.mu.Unlock()
			return
		}
		st := p.ready[0]
		p.ready[0] = nil
		p.ready = p.ready[1:]
		st.queued = false
		p.mu.Unlock()
		p.probeSafely(st)
	}
}

// probeSafely is probe, and a panic in it (a bug, never bad input) does not
// take the proxy down: it is logged at error with the stack, the endpoint
// keeps its state and is probed again after an interval, and the worker goes
// on with the queue.
func (p *prober) probeSafely(st *probeState) {
	defer func() {
		if r := recover(); r != nil {
			p.logger.Load().Error("health probe panicked; the endpoint keeps its state and is probed again after an interval",
				zap.String("service", p.svc.String()), zap.String("endpoint", st.Endpoint.Dial),
				zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
			p.mu.Lock()
			defer p.mu.Unlock()
			if !p.stopped && p.states[st.Endpoint.Dial] == st {
				st.timer.Reset(p.cfg.Interval)
			}
		}
	}()
	p.probe(st)
}

// probe checks one endpoint, taken from the queue while it was still
// discovered, records the result and schedules the next probe.
func (p *prober) probe(st *probeState) {
	err := p.run(st.ctx, st.Endpoint)
	if ev, prev, ok := p.record(st, err); ok && ev.Changed {
		p.logChange(ev, prev)
		if p.changed != nil {
			p.changed(ev, prev)
		}
	}
}

// record takes a probe's result into st, under the lock (released also if
// something in it panics); ok is false when the endpoint left DNS meanwhile.
func (p *prober) record(st *probeState, err error) (ev CheckEvent, prev HealthState, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped || p.states[st.Endpoint.Dial] != st {
		return ev, prev, false // the endpoint left DNS meanwhile: forget the result
	}
	now := time.Now()
	prev = st.State
	st.LastCheck, st.LastError = now, err
	if err == nil {
		st.Passes++
		st.Fails = 0
		if prev == Unhealthy && st.Passes >= p.cfg.Passes || prev == Unknown {
			st.State = Healthy
		}
	} else {
		st.Fails++
		st.Passes = 0
		// A new endpoint fails at its first probe unless it gets traffic
		// meanwhile (optimistic): then it takes `fails` like a healthy one.
		if prev == Healthy && st.Fails >= p.cfg.Fails || prev == Unknown && (!p.cfg.Optimistic || st.Fails >= p.cfg.Fails) {
			st.State = Unhealthy
		}
	}
	changed := st.State != prev
	if changed && st.State == Healthy && p.cfg.SlowStart > 0 && (prev == Unhealthy || st.late) {
		st.RampFrom = now
	}
	if st.State != Healthy {
		st.RampFrom = time.Time{}
	}
	ev = CheckEvent{Service: p.svc, Endpoint: st.Endpoint, Passed: err == nil, Err: err, State: st.State, Changed: changed}
	if changed {
		st.Since = now
		p.publishLocked()
	}
	if p.stats != nil {
		p.stats.check(ev.Passed, changed, ev.State)
	}
	if p.observe != nil {
		p.observe(ev) // under the lock: events come in the order of the probes
	}
	st.timer.Reset(p.cfg.Interval - time.Duration(rand.Int64N(int64(p.cfg.Jitter)+1)))
	return ev, prev, true
}

func (p *prober) logChange(ev CheckEvent, prev HealthState) {
	log := p.logger.Load()
	fields := []zap.Field{zap.String("service", p.svc.String()), zap.String("endpoint", ev.Endpoint.Dial),
		zap.String("from", prev.String()), zap.String("to", ev.State.String())}
	switch {
	case ev.State == Unhealthy:
		log.Warn("endpoint failed health checks; no requests go to it until it passes", append(fields, zap.Error(ev.Err))...)
	case prev == Unknown:
		log.Debug("endpoint passed its first health check", fields...)
	default:
		log.Info("endpoint passes health checks again", fields...)
	}
}

// check runs one probe.
func (p *prober) check(e Endpoint) error { return p.checkCtx(p.ctx, e) }

// checkCtx runs one probe, ended early by ctx.
func (p *prober) checkCtx(ctx context.Context, e Endpoint) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	port := e.Port
	if p.cfg.Port != 0 {
		port = p.cfg.Port
	}
	addr := net.JoinHostPort(e.IP.String(), strconv.Itoa(int(port)))
	if p.cfg.TCP {
		conn, err := p.dialer.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return conn.Close()
	}
	scheme := "http"
	if p.cfg.TLS != nil {
		scheme = "https"
	}
	u, err := url.Parse(scheme + "://" + addr + p.cfg.URI)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, p.cfg.Method, u.String(), nil)
	if err != nil {
		return err
	}
	for k, vs := range p.cfg.Headers {
		if http.CanonicalHeaderKey(k) == "Host" && len(vs) > 0 {
			req.Host = vs[0]
			continue
		}
		req.Header[http.CanonicalHeaderKey(k)] = vs
	}
	req.Header.Set("User-Agent", "caddy-headless health check")
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if !statusMatches(p.cfg.Status, resp.StatusCode) {
		io.Copy(io.Discard, io.LimitReader(resp.Body, maxHealthBody))
		return fmt.Errorf("status %d, want %s", resp.StatusCode, statusText(p.cfg.Status))
	}
	if p.cfg.Body != nil {
		body, err := io.ReadAll(io.LimitReader(resp.Body, maxHealthBody))
		if err != nil {
			return fmt.Errorf("reading body: %w", err)
		}
		if !p.cfg.Body.Match(body) {
			return fmt.Errorf("body does not match %q", p.cfg.Body.String())
		}
	}
	return nil
}

func statusMatches(want, got int) bool {
	switch {
	case want == 0:
		return got >= 200 && got < 300
	case want < 10:
		return got/100 == want
	}
	return got == want
}

func statusText(want int) string {
	switch {
	case want == 0:
		return "2xx"
	case want < 10:
		return strconv.Itoa(want) + "xx"
	}
	return strconv.Itoa(want)
}

// stop ends every timer and waits for the probes in flight.
func (p *prober) stop() {
	p.mu.Lock()
	p.stopped = true
	for _, st := range p.states {
		st.timer.Stop()
	}
	p.ready = nil
	p.mu.Unlock()
	p.cancel()
	p.wg.Wait()
	if p.client != nil {
		p.client.CloseIdleConnections()
	}
}

// ErrNoneHealthy is wrapped by the error requests get when no endpoint passes
// health checks and fail_fast is set.
var ErrNoneHealthy = errors.New("no endpoint passes health checks")
