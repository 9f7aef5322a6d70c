package discovery

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-headless/caddy-headless/internal/clock"
)

// Config is everything a Watcher needs. Configs with equal Keys ask the same
// question the same way, which is what lets callers share one Watcher.
type Config struct {
	Service  Service
	IPv4     bool // ask A records (or take A glue for SRV targets)
	IPv6     bool // ask AAAA records (or take AAAA glue)
	Resolver *Resolver
	// RefreshMin and RefreshMax clamp the record TTL into the re-check
	// interval. Default: DefaultRefresh, and RefreshMax = RefreshMin.
	RefreshMin, RefreshMax time.Duration
	// Stale bounds how long the last good set is kept while lookups fail;
	// 0 keeps it until DNS answers again.
	Stale time.Duration
	// Health, if set, turns on active health checks of the endpoints.
	Health *HealthCheck
	// Addresses decides which endpoint addresses are used; by default not
	// loopback or link-local ones.
	Addresses AddressPolicy
	// API, if set, reads the Service's EndpointSlices from this apiserver
	// (`via api`, apiwatch.go) instead of asking DNS; Resolver and the
	// refresh interval are then unused.
	API *APISource
}

// DefaultRefresh is the re-check interval when a Config sets none: cluster DNS
// answers from memory and shows a pod change within tens of milliseconds.
const DefaultRefresh = time.Second

// WithDefaults returns c with its zero fields set to their defaults (the
// Resolver and the HealthCheck are copied, not changed). Invalid values, such
// as negative durations, are left for the caller to reject.
func (c Config) WithDefaults() Config {
	if c.RefreshMin == 0 {
		c.RefreshMin = DefaultRefresh
	}
	if c.RefreshMax == 0 {
		c.RefreshMax = c.RefreshMin
	}
	r := &Resolver{Timeout: DefaultTimeout, UDPSize: DefaultUDPSize}
	if c.Resolver != nil {
		// In the form NormalizeServer gives ("host" → "host:53"); one that
		// cannot be put in it stays as it is, for Validate to refuse.
		r.Servers = make([]string, len(c.Resolver.Servers))
		for i, s := range c.Resolver.Servers {
			if r.Servers[i], _ = NormalizeServer(s); r.Servers[i] == "" {
				r.Servers[i] = s
			}
		}
		if c.Resolver.Timeout != 0 {
			r.Timeout = c.Resolver.Timeout
		}
		if c.Resolver.UDPSize != 0 {
			r.UDPSize = c.Resolver.UDPSize
		}
	}
	c.Resolver = r
	if c.Health != nil {
		h := c.Health.withDefaults()
		c.Health = &h
	}
	return c
}

// Key identifies the question a Config asks and how: Watchers may be shared
// exactly between Configs with equal Keys. Every field that changes what the
// Watcher does is in it (TestConfigKeyCoversEveryField checks that); the
// Service's Ref, how the user wrote the name, is not.
func (c Config) Key() string {
	c = c.WithDefaults()
	r := c.Resolver
	key := fmt.Sprintf("%s port=%d v4=%t v6=%t servers=%q timeout=%s udp=%d refresh=%s-%s stale=%s",
		c.Service.QName(), c.Service.Port, c.IPv4, c.IPv6, r.Servers, r.Timeout, r.UDPSize,
		c.RefreshMin, c.RefreshMax, c.Stale)
	key += " addresses: " + c.Addresses.key()
	key += c.API.key()
	if h := c.Health; h != nil {
		body := ""
		if h.Body != nil {
			body = h.Body.String()
		}
		var hdr []string
		for k, vs := range h.Headers {
			hdr = append(hdr, http.CanonicalHeaderKey(k)+"="+strings.Join(vs, ","))
		}
		slices.Sort(hdr)
		key += fmt.Sprintf(" health: tcp=%t %q %q port=%d status=%d body=%q headers=%q every=%s~%s timeout=%s passes=%d fails=%d inflight=%d optimistic=%t failfast=%t slowstart=%s tls=%q",
			h.TCP, h.Method, h.URI, h.Port, h.Status, body, hdr, h.Interval, h.Jitter, h.Timeout, h.Passes, h.Fails,
			h.MaxInFlight, h.Optimistic, h.FailFast, h.SlowStart, h.TLS.key())
	}
	return key
}

// MaxErrorBackoff caps the wait between attempts while lookups fail, so that
// recovery is noticed within seconds whatever the refresh interval.
const MaxErrorBackoff = 5 * time.Second

// minKickGap rate-limits refreshes requested from outside (ResetCache on every
// retried request must not turn into a DNS query per request).
const minKickGap = 200 * time.Millisecond

// Snapshot is an immutable view of a Watcher's state. Never modify one.
type Snapshot struct {
	Service Service
	// Endpoints are the addresses to dial, sorted. Empty when the Service has no
	// ready endpoints, or when the stale bound expired.
	Endpoints []Endpoint
	// Outcome of the last lookup.
	Outcome Outcome
	// TTL seen in the last successful answer.
	TTL time.Duration
	// Cached is set once two answers of the same records from the same
	// server showed a TTL that counts down: the cluster's DNS (CoreDNS's
	// kubernetes plugin answers with a fixed TTL) sits behind a cache, whose
	// answers may be up to MaxTTL old. It stays set. MaxTTL is the longest
	// TTL any answer had.
	Cached bool
	MaxTTL time.Duration
	// Server that gave the last successful answer.
	Server string
	// Resolved is when DNS last answered definitively (records, NXDOMAIN or NODATA).
	Resolved time.Time
	// Err is the last lookup's error (nil after a success); ErrAt is when it happened.
	Err   error
	ErrAt time.Time
	// StaleSince is when lookups started failing while endpoints were kept; zero
	// when the set is fresh. Expired reports that Stale passed and the set was dropped.
	StaleSince time.Time
	Expired    bool
	// Next is when the next lookup is due.
	Next time.Time
	// Seq counts lookups; a snapshot carries the number of the lookup that made it.
	Seq uint64
	// Unavailable is the error handed to requests when Endpoints is empty.
	Unavailable error
	// API is what the EndpointSlice watch saw (`via api`); nil for DNS.
	API *APIState
}

// Stale reports whether the endpoints are kept from an earlier answer.
func (s *Snapshot) Stale() bool { return !s.StaleSince.IsZero() }

// Watcher keeps one Service's endpoints fresh in the background.
type Watcher struct {
	cfg    Config
	logger atomic.Pointer[zap.Logger] // the newest attached one, else Start's
	snap   atomic.Pointer[Snapshot]
	stats  stats
	coin   func() float64 // slow start's draws, in [0,1)

	kick   chan struct{}
	ctx    context.Context // the run goroutine's
	cancel context.CancelFunc
	begin  sync.Once // starts the run goroutine, or (in Stop) makes sure it never starts
	done   chan struct{}

	mu        sync.Mutex
	published chan struct{} // closed and replaced on every publish
	base      *zap.Logger   // Start's logger, used when none is attached
	attached  []*zap.Logger // by AttachLogger, oldest first

	started atomic.Uint64 // Seq of the newest lookup started
	warned  warnings      // owned by the run goroutine

	prober *prober     // nil without health checks
	aside  *aside      // endpoints whose dial failed
	clock  clock.Clock // the run loop's time: real, or one a test moves (TestWatcherKickIsRateLimited)

	running atomic.Bool // set when begin started the run goroutine

	traffic   traffic   // requests handed out (traffic.go)
	listeners listeners // of events (events.go)
}

// ErrNotResolved is returned while a Service has never been resolved.
var ErrNotResolved = errors.New("not resolved yet")

// Run begins resolving in the background, if the Watcher has not yet begun
// (or been stopped). A Watcher made by New asks no DNS before Run, or before
// the first Endpoints call, whichever comes first.
func (w *Watcher) Run() {
	w.begin.Do(func() {
		w.running.Store(true)
		if w.cfg.API != nil {
			go w.runAPI(w.ctx)
			return
		}
		go w.run(w.ctx)
	})
}

// Running reports whether Run (or a request, or RefreshNow) started the
// Watcher: a config that is still loading has Watchers that do not run yet.
func (w *Watcher) Running() bool { return w.running.Load() }

// New creates a Watcher for cfg (with its defaults filled in) that does
// nothing until Run.
func New(cfg Config, logger *zap.Logger) *Watcher {
	cfg = cfg.WithDefaults()
	cfg.RefreshMin = max(cfg.RefreshMin, time.Millisecond) // callers validate; never spin
	cfg.RefreshMax = max(cfg.RefreshMax, cfg.RefreshMin)
	if logger == nil {
		logger = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &Watcher{
		cfg:       cfg,
		coin:      rand.Float64,
		clock:     clock.Real{},
		kick:      make(chan struct{}, 1),
		cancel:    cancel,
		done:      make(chan struct{}),
		published: make(chan struct{}),
		base:      logger,
	}
	w.stats.init()
	w.logger.Store(logger)
	if cfg.Health != nil {
		w.prober = newProber(*cfg.Health, cfg.Service, &w.logger)
		w.prober.stats = &w.stats
		w.prober.changed = w.emitHealth
	}
	w.ctx = ctx
	w.aside = newAside(ctx, cfg.Service, &w.logger)
	return w
}

// Config returns the configuration the Watcher runs with, defaults filled in.
func (w *Watcher) Config() Config { return w.cfg }

// AttachLogger makes the Watcher log through l until detach is called. Of
// the attached loggers the newest is used: a shared Watcher logs through the
// newest configuration that uses it and, once that configuration is dropped
// (unloaded, or failed to load), through the one before again.
func (w *Watcher) AttachLogger(l *zap.Logger) (detach func()) {
	if l == nil {
		return func() {}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.attached = append(w.attached, l)
	w.logger.Store(l)
	var once sync.Once
	return func() {
		once.Do(func() {
			w.mu.Lock()
			defer w.mu.Unlock()
			// The same logger may be attached twice: drop one copy of it.
			for i := len(w.attached) - 1; i >= 0; i-- {
				if w.attached[i] == l {
					w.attached = slices.Delete(w.attached, i, i+1)
					break
				}
			}
			top := w.base
			if n := len(w.attached); n > 0 {
				top = w.attached[n-1]
			}
			w.logger.Store(top)
		})
	}
}

// Snapshot returns the current state; nil until the first lookup has finished.
func (w *Watcher) Snapshot() *Snapshot { return w.snap.Load() }

// Stop ends the refresh loop and waits for it, cancelling a lookup in flight.
func (w *Watcher) Stop() {
	w.cancel()
	w.begin.Do(func() { close(w.done) }) // never ran
	<-w.done
	if w.prober != nil {
		w.prober.stop()
	}
	w.aside.stop()
}

// Destruct stops the Watcher; it lets a caddy.UsagePool release it.
func (w *Watcher) Destruct() error {
	w.Stop()
	return nil
}

// Refresh asks for a lookup soon, without waiting for it.
func (w *Watcher) Refresh() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// RefreshNow asks for a lookup and waits until one that started after this call
// has finished, or ctx ends.
func (w *Watcher) RefreshNow(ctx context.Context) (*Snapshot, error) {
	return w.RequestRefresh()(ctx)
}

// RequestRefresh is RefreshNow in two steps, so that a caller can ask many
// Watchers before it waits for any: it asks for a lookup now and returns
// the wait, which returns once a lookup that started after the request has
// finished, or ctx ends. Requests that meet coalesce into one lookup (two,
// when one was in flight already): this is the only place refreshes are
// coalesced.
func (w *Watcher) RequestRefresh() (wait func(ctx context.Context) (*Snapshot, error)) {
	// A lookup in flight may have started before this call: wait for the one
	// after it. Without one in flight, the next lookup will do.
	w.Run() // asked for explicitly: the Service is in use
	after := w.started.Load()
	// One kick is enough: it stays queued until the loop takes it, and a taken
	// kick always leads to a lookup. Kicking again on every wake-up could queue
	// a second one behind it: a lookup nobody asked for.
	w.Refresh()
	return func(ctx context.Context) (*Snapshot, error) { return w.waitAfter(ctx, after) }
}

// waitAfter waits until a snapshot of a lookup later than after is out.
func (w *Watcher) waitAfter(ctx context.Context, after uint64) (*Snapshot, error) {
	for {
		w.mu.Lock()
		ch := w.published
		w.mu.Unlock()
		if s := w.snap.Load(); s != nil && s.Seq > after {
			return s, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return w.snap.Load(), ctx.Err()
		case <-w.done:
			return w.snap.Load(), errors.New("watcher stopped")
		}
	}
}

// Wait returns the snapshot, waiting for the first lookup to finish if there is
// none yet, for at most timeout or until ctx ends.
func (w *Watcher) Wait(ctx context.Context, timeout time.Duration) *Snapshot {
	if s := w.snap.Load(); s != nil {
		return s
	}
	w.mu.Lock()
	ch := w.published
	w.mu.Unlock()
	if s := w.snap.Load(); s != nil {
		return s
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	case <-ctx.Done():
	case <-w.done:
	}
	return w.snap.Load()
}

func (w *Watcher) publish(s *Snapshot) {
	if w.prober != nil {
		// Before the snapshot is visible, so its health view is there too.
		w.prober.update(s)
	}
	w.aside.update(s)
	prev := w.snap.Swap(s)
	w.mu.Lock()
	close(w.published)
	w.published = make(chan struct{})
	w.mu.Unlock()
	w.emitChange(prev, s)
}

// panicRestartDelay is how long the refresh loop waits before its first
// lookup after it recovered from a panic (or minKickGap, when a request asks
// for a lookup): a panic that repeats at every lookup does not spin.
const panicRestartDelay = time.Second

// run is the refresh loop's goroutine: it runs loop until ctx ends. A panic
// in a lookup (a bug, never bad input) must not take the proxy down with
// it: loop recovers, logs at error with the stack, and is started again;
// the last published snapshot is served meanwhile.
func (w *Watcher) run(ctx context.Context) {
	defer close(w.done)
	for first := time.Duration(0); !w.loop(ctx, first); first = panicRestartDelay {
	}
}

// loop refreshes until ctx ends (true), or until a panic, which it
// recovers from and logs (false). Its first lookup is first from now; the
// lookup count goes on from the last one started, so RefreshNow and the
// missing-family rule see no difference across a restart.
func (w *Watcher) loop(ctx context.Context, first time.Duration) (ended bool) {
	defer func() {
		if p := recover(); p != nil {
			w.logger.Load().Error("DNS refresh loop panicked; serving the last endpoints and restarting it",
				zap.String("service", w.cfg.Service.String()), zap.Duration("restart_in", panicRestartDelay),
				zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
			ended = false
		}
	}()
	timer := w.clock.NewTimer(first)
	defer timer.Stop()
	seq := w.started.Load()
	var failures int
	var lastStart time.Time
	if first > 0 {
		lastStart = w.clock.Now() // a kick waits minKickGap after a restart
	}
	var single family // of the last answer, if it had only one
	gapArmed := false // the timer waits for the end of the kick gap
	for {
		select {
		case <-ctx.Done():
			return true
		case <-timer.C():
		case <-w.kick:
			if gap := w.clock.Now().Sub(lastStart); gap < minKickGap {
				// Refreshed a moment ago: do the requested one after the gap
				// (once: more kicks meanwhile change nothing).
				if !gapArmed {
					timer.Reset(minKickGap - gap)
					gapArmed = true
				}
				continue
			}
		}
		gapArmed = false
		// This lookup answers the kicks sent so far (even if the timer started
		// it): drop a pending one rather than look up twice in a row. Drain
		// before publishing the new seq, so RefreshNow never loses its kick.
		select {
		case <-w.kick:
		default:
		}
		seq++
		w.started.Store(seq)
		lastStart = w.clock.Now()
		res, err := w.lookup(ctx, single, seq)
		if err == nil && res.Partial != nil && hasFamily(w.snap.Load(), failedFamily(res.Partial)) {
			// Taking the answer would drop the failed family's endpoints we
			// have: a transient failure, as if both had failed.
			err = res.Partial
		}
		if err == nil {
			single = familyOf(res.Endpoints)
			if res.Partial != nil {
				single = 0 // keep asking the family that failed
			}
		}
		if ctx.Err() != nil {
			return true
		}
		now := w.clock.Now()
		if err != nil {
			failures++
		} else {
			failures = 0
		}
		s := w.applyLookup(w.snap.Load(), res, err, now, seq, failures)
		w.logLookup(s, res, err, now.Sub(lastStart))
		w.stats.lookup(s.Outcome, now.Sub(lastStart), res)
		w.publish(s)
		if !timer.Stop() {
			select {
			case <-timer.C():
			default:
			}
		}
		timer.Reset(s.Next.Sub(now))
	}
}

// A cluster is mostly single-stack: asking A and AAAA every second for each
// Service, half the answers would be NODATA forever. While the last answer
// had addresses of one family only, the other is asked only every
// missingFamilyEvery-th lookup, so a Service that becomes dual-stack is seen
// within missingFamilyEvery refresh intervals (30 s at the default 1 s).
// Services with named ports ask SRV, one query for both families: no rule.
const missingFamilyEvery = 30

// family is the address family of a set of endpoints: 4, 6, or 0 for both
// or none.
type family int

func familyOf(eps []Endpoint) family {
	var v4, v6 bool
	for _, e := range eps {
		v4, v6 = v4 || e.IP.Is4(), v6 || !e.IP.Is4()
	}
	switch {
	case v4 && !v6:
		return 4
	case v6 && !v4:
		return 6
	}
	return 0
}

// lookup asks DNS for the configured families, or only for single, the
// family of the last answer, when the rule above allows. If that one then
// has no addresses, the other is asked at once: a set is never emptied for
// a family that was not asked.
func (w *Watcher) lookup(ctx context.Context, single family, seq uint64) (Result, error) {
	v4, v6 := w.cfg.IPv4, w.cfg.IPv6
	if !v4 || !v6 || single == 0 || w.cfg.Service.SRV() || seq%missingFamilyEvery == 0 {
		return w.cfg.Resolver.LookupAllowed(ctx, w.cfg.Service, v4, v6, w.cfg.Addresses)
	}
	res, err := w.cfg.Resolver.LookupAllowed(ctx, w.cfg.Service, single == 4, single == 6, w.cfg.Addresses)
	if err != nil || len(res.Endpoints) > 0 {
		return res, err
	}
	again, err := w.cfg.Resolver.LookupAllowed(ctx, w.cfg.Service, v4, v6, w.cfg.Addresses)
	again.Queries += res.Queries
	again.Truncated += res.Truncated
	return again, err
}

// applyLookup turns a finished lookup into the snapshot that follows prev:
// an answer replaces the endpoints, a failure keeps them within the stale
// bound. Either way it logs, advances the warnings' state and schedules the
// next lookup (Snapshot.Next); the caller publishes the snapshot.
func (w *Watcher) applyLookup(prev *Snapshot, res Result, err error, now time.Time, seq uint64, failures int) *Snapshot {
	s := &Snapshot{Service: w.cfg.Service, Seq: seq}
	if prev != nil {
		*s = *prev
		s.Seq = seq
	}
	if err != nil {
		w.applyFailure(s, prev, res, err, now, failures)
	} else {
		w.applyAnswer(s, prev, res, now)
	}
	return s
}

// applyAnswer makes s (a copy of prev, or new) hold DNS's answer res, and
// logs the change and what the answer left out.
func (w *Watcher) applyAnswer(s, prev *Snapshot, res Result, now time.Time) {
	log := w.logger.Load()
	svc := w.cfg.Service
	cached := countsDown(prev, res)
	s.Endpoints, s.Outcome, s.TTL, s.Server = res.Endpoints, res.Outcome, res.TTL, res.Server
	if res.Outcome == OutcomeSuccess {
		s.MaxTTL = max(s.MaxTTL, res.TTL)
	}
	if cached && !s.Cached {
		s.Cached = true
		log.Warn("DNS answers come from a cache: their TTL counts down between lookups, so a change to the Service (an endpoint that leaves) can be seen up to max_age late; requests still avoid endpoints that refuse connections. To see changes at once, point resolvers at the cluster DNS behind the cache (the kube-dns-upstream Service under NodeLocal DNSCache); see the README, Freshness in a real cluster",
			zap.String("service", svc.String()), zap.String("server", res.Server),
			zap.Duration("max_age", s.MaxTTL), zap.Duration("ttl", res.TTL), zap.Duration("previous_ttl", prev.TTL))
	}
	s.Resolved, s.Err, s.ErrAt, s.StaleSince, s.Expired = now, nil, time.Time{}, time.Time{}, false
	s.Next = now.Add(jitter(clamp(res.TTL, w.cfg.RefreshMin, w.cfg.RefreshMax)))
	if len(s.Endpoints) == 0 {
		s.Unavailable = fmt.Errorf("service %s has no ready endpoints (%s from DNS server %s): check the Service's EndpointSlices and readiness",
			svc, strings.ToUpper(string(res.Outcome)), res.Server)
	} else {
		s.Unavailable = nil
	}
	w.logChange(log, prev, s, res)
	if res.Dropped > 0 && w.warned.due(&w.warned.bound, "bound", now) {
		log.Warn("DNS answer exceeded a bound; extra records ignored",
			zap.String("service", svc.String()), zap.Int("dropped", res.Dropped))
	}
	w.logRefused(log, res, now)
	w.logPartial(log, res, now)
}

// applyFailure makes s (a copy of prev, or new) follow the lookup that
// failed with err, the failures-th in a row: a transient failure keeps what
// s has, within the stale bound, and the next lookup backs off. It warns
// when failures start or change kind, then at most every 30 s.
func (w *Watcher) applyFailure(s, prev *Snapshot, res Result, err error, now time.Time, failures int) {
	log := w.logger.Load()
	svc := w.cfg.Service
	backoff := min(250*time.Millisecond<<min(failures-1, 10), MaxErrorBackoff, w.cfg.RefreshMax)
	s.Next = now.Add(jitter(backoff))
	s.Outcome, s.Err, s.ErrAt = outcomeOf(err), err, now
	consequence, dropped := w.keepLastSet(s, err, now, "DNS")
	if dropped {
		log.Warn("DNS refresh failed past the stale bound; dropping endpoints: requests to "+svc.String()+" will fail",
			zap.String("service", svc.String()), zap.Int("dropped", len(prev.Endpoints)), zap.Error(err))
		w.warned.failure = warnState{what: "expired", at: now}
		return
	}
	if prev == nil || prev.Err == nil {
		w.warned.failure = warnState{}
	}
	if res.RefusedCount > 0 { // an answer of refused addresses only; a failed lookup says nothing of them
		w.logRefused(log, res, now)
	}
	if w.warned.due(&w.warned.failure, failureKind(err), now) {
		log.Warn("DNS refresh failed; "+consequence,
			zap.String("service", svc.String()), zap.Int("failures", failures), zap.Error(err))
	}
}

// keepLastSet applies the one rule for a failed refresh, whatever the
// source: the endpoints of the last answer are kept, within the stale bound,
// past which they are dropped. s is the snapshot that follows (a copy of the
// last one); source names what failed ("DNS", "the apiserver"). It says what
// this means for requests, and whether the endpoints were just dropped; a
// scheduled s.Next is brought forward to the bound.
func (w *Watcher) keepLastSet(s *Snapshot, err error, now time.Time, source string) (consequence string, dropped bool) {
	svc := w.cfg.Service
	switch {
	case s.Resolved.IsZero():
		s.Unavailable = fmt.Errorf("service %s: %w: %v", svc, ErrNotResolved, err)
		return "no endpoints yet: requests to " + svc.String() + " will fail until " + source + " answers", false
	case len(s.Endpoints) == 0:
		s.Unavailable = fmt.Errorf("service %s has no endpoints and %s fails: %v", svc, source, err)
		return "no endpoints: requests to " + svc.String() + " will fail", false
	}
	if s.StaleSince.IsZero() {
		s.StaleSince = now
	}
	if w.cfg.Stale > 0 {
		deadline := s.StaleSince.Add(w.cfg.Stale)
		if !now.Before(deadline) {
			s.Endpoints, s.Expired = nil, true
			s.Unavailable = fmt.Errorf("service %s: %s has failed for %s, longer than stale %s, so its endpoints were dropped: %v",
				svc, source, now.Sub(s.StaleSince).Round(time.Second), w.cfg.Stale, err)
			return "past the stale bound: endpoints dropped, requests to " + svc.String() + " will fail", true
		}
		if !s.Next.IsZero() && deadline.Before(s.Next) {
			s.Next = deadline
		}
	}
	return fmt.Sprintf("keeping %d endpoints from %s ago", len(s.Endpoints), now.Sub(s.Resolved).Round(time.Second)), false
}

// countsDown reports whether res repeats prev's answer (same server, same
// records) with a lower TTL: the answer aged in a cache. A server that
// answers from its data (CoreDNS's kubernetes plugin) gives the same TTL
// every time.
func countsDown(prev *Snapshot, res Result) bool {
	return prev != nil && prev.Err == nil && prev.Outcome == OutcomeSuccess && res.Outcome == OutcomeSuccess &&
		prev.Server == res.Server && res.TTL < prev.TTL && slices.Equal(prev.Endpoints, res.Endpoints)
}

func (w *Watcher) logChange(log *zap.Logger, prev, s *Snapshot, res Result) {
	var old []Endpoint
	if prev != nil {
		old = prev.Endpoints
	}
	added, removed := diff(old, s.Endpoints)
	if prev != nil && prev.Err != nil {
		log.Info("DNS refresh recovered", zap.String("service", w.cfg.Service.String()),
			zap.Int("endpoints", len(s.Endpoints)), zap.Duration("failing_for", s.Resolved.Sub(prev.ErrAt)))
	}
	if len(added) > 0 || len(removed) > 0 || prev == nil || prev.Expired {
		fields := []zap.Field{zap.String("service", w.cfg.Service.String()),
			zap.Strings("added", firstN(added)), zap.Strings("removed", firstN(removed)),
			zap.Int("endpoints", len(s.Endpoints)), zap.String("outcome", string(res.Outcome)),
			zap.String("server", res.Server)}
		if len(s.Endpoints) == 0 {
			// DNS says the Service has no ready endpoints: as bad for requests as an error.
			log.Warn("endpoints changed", append(fields, zap.String("consequence",
				"no endpoints: requests to "+w.cfg.Service.String()+" will fail"))...)
		} else {
			log.Info("endpoints changed", fields...)
		}
	}
}

// logLookup writes the debug line every lookup gets, failed or not.
func (w *Watcher) logLookup(s *Snapshot, res Result, err error, took time.Duration) {
	c := w.logger.Load().Check(zap.DebugLevel, "lookup")
	if c == nil {
		return
	}
	fields := []zap.Field{zap.String("service", w.cfg.Service.String()), zap.String("outcome", string(s.Outcome)),
		zap.Int("endpoints", len(s.Endpoints)), zap.Duration("duration", took), zap.Int("queries", res.Queries),
		zap.Int("truncated", res.Truncated)}
	if err != nil {
		fields = append(fields, zap.Error(err))
	} else {
		fields = append(fields, zap.Duration("ttl", res.TTL), zap.String("server", res.Server))
	}
	c.Write(fields...)
}

// firstN bounds an address list for a log line: a 1,000-endpoint rollout
// must not make a 30 KB log line.
func firstN(l []string) []string {
	const n = 20
	if len(l) <= n {
		return l
	}
	return append(l[:n:n], fmt.Sprintf("... and %d more", len(l)-n))
}

// diff lists the dial addresses only in b (added) and only in a (removed); both are sorted.
func diff(a, b []Endpoint) (added, removed []string) {
	in := make(map[string]bool, len(a))
	for _, e := range a {
		in[e.Dial] = true
	}
	for _, e := range b {
		if !in[e.Dial] {
			added = append(added, e.Dial)
		}
		delete(in, e.Dial)
	}
	for _, e := range a {
		if in[e.Dial] {
			removed = append(removed, e.Dial)
		}
	}
	return added, removed
}

func outcomeOf(err error) Outcome {
	var le *LookupError
	if errors.As(err, &le) {
		return le.Outcome
	}
	return OutcomeNetwork
}

func clamp(d, lo, hi time.Duration) time.Duration { return max(lo, min(d, hi)) }

// jitter lengthens d by up to 10%, so watchers started together spread out
// and a Service is asked at most once per d on average: shortening it
// instead would raise every Service's query rate by 5%.
func jitter(d time.Duration) time.Duration {
	return d + time.Duration(rand.Int64N(int64(d)/10+1))
}
