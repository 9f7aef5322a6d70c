package discovery

import (
	"context"
	"net"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Endpoints leave the way pods leave: stopped in the same moment they leave
// the Service, or silent behind a lost node while still listed as ready. DNS
// names such an endpoint until it catches up, up to 30 s longer behind a
// cache. The proxy learns of it first, when a dial to it fails: SetAside
// then keeps it from every request until a connection to it succeeds again
// (a TCP probe in the background, the first one at once) or it leaves DNS.
// An endpoint that failed for another reason (an error after the request was
// sent) accepts the first probe and is back within a round trip.

// Probe timing of a set-aside endpoint: each probe may take asideProbeTimeout;
// after a failed one the next waits asideFirstRetry, doubling up to
// asideMaxRetry.
const (
	asideProbeTimeout = 2 * time.Second
	asideFirstRetry   = 250 * time.Millisecond
	asideMaxRetry     = 5 * time.Second
)

// aside is a Watcher's set of endpoints set aside after a failed dial.
type aside struct {
	ctx    context.Context // the Watcher's: ends every probe on Stop
	logger *atomic.Pointer[zap.Logger]
	svc    Service
	dial   func(ctx context.Context, addr string) error

	mu     sync.Mutex
	probes map[string]context.CancelFunc // by Dial; at most one per endpoint of the snapshot
	snap   *Snapshot                     // the newest published, for update and rebuild
	wg     sync.WaitGroup

	view atomic.Pointer[asideView]
}

// asideView is what the request path reads: immutable.
type asideView struct {
	seq  uint64          // the Snapshot it was made for
	set  map[string]bool // Dials set aside
	rest []Endpoint      // that Snapshot's endpoints not set aside
}

func newAside(ctx context.Context, svc Service, logger *atomic.Pointer[zap.Logger]) *aside {
	return &aside{ctx: ctx, svc: svc, logger: logger, dial: dialTCP, probes: map[string]context.CancelFunc{}}
}

func dialTCP(ctx context.Context, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, asideProbeTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err == nil {
		c.Close()
	}
	return err
}

// SetAside keeps the endpoint dial (as in Endpoint.Dial) from requests until
// a connection to it succeeds or it leaves DNS. The proxy calls it when a dial
// to the endpoint failed. An address the Service does not have is ignored.
func (w *Watcher) SetAside(dial string) { w.aside.add(dial) }

// SetAsideEndpoints lists the endpoints set aside now, sorted.
func (w *Watcher) SetAsideEndpoints() []string {
	v := w.aside.view.Load()
	if v == nil || len(v.set) == 0 {
		return nil
	}
	out := make([]string, 0, len(v.set))
	for d := range v.set {
		out = append(out, d)
	}
	slices.Sort(out)
	return out
}

func (a *aside) add(dial string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ctx.Err() != nil || a.snap == nil || a.probes[dial] != nil || !has(a.snap.Endpoints, dial) {
		return
	}
	ctx, cancel := context.WithCancel(a.ctx)
	a.probes[dial] = cancel
	a.logger.Load().Info("endpoint set aside: a connection to it failed; it gets no requests until one succeeds or it leaves DNS",
		zap.String("service", a.svc.String()), zap.String("endpoint", dial))
	a.rebuildLocked()
	a.wg.Add(1)
	go a.probe(ctx, dial)
}

// probe connects to dial until a connection succeeds, then takes it back.
func (a *aside) probe(ctx context.Context, dial string) {
	defer a.wg.Done()
	defer func() {
		if p := recover(); p != nil {
			a.logger.Load().Error("set-aside probe panicked; taking the endpoint back",
				zap.String("service", a.svc.String()), zap.String("endpoint", dial),
				zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
			a.remove(dial, "")
		}
	}()
	wait := time.Duration(0)
	for {
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		if err := a.dial(ctx, dial); err == nil {
			a.remove(dial, "endpoint taken back: it accepts connections again")
			return
		}
		if ctx.Err() != nil {
			return
		}
		wait = min(max(2*wait, asideFirstRetry), asideMaxRetry)
	}
}

func (a *aside) remove(dial, msg string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	cancel := a.probes[dial]
	if cancel == nil {
		return
	}
	cancel()
	delete(a.probes, dial)
	// Logged before the view changes, so that whoever sees the endpoint
	// back can also find the line.
	if msg != "" {
		a.logger.Load().Info(msg, zap.String("service", a.svc.String()), zap.String("endpoint", dial))
	}
	a.rebuildLocked()
}

// update follows a new Snapshot: endpoints that left DNS are forgotten (their
// probes end), the view is made for s. Called before s is published.
func (a *aside) update(s *Snapshot) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.snap = s
	for d, cancel := range a.probes {
		if !has(s.Endpoints, d) {
			cancel()
			delete(a.probes, d)
		}
	}
	a.rebuildLocked()
}

func (a *aside) rebuildLocked() {
	if len(a.probes) == 0 {
		a.view.Store(nil)
		return
	}
	v := &asideView{seq: a.snap.Seq, set: make(map[string]bool, len(a.probes))}
	for d := range a.probes {
		v.set[d] = true
	}
	v.rest = without(a.snap.Endpoints, v.set)
	a.view.Store(v)
}

// filter takes the endpoints set aside out of eps, chosen from s. When every
// one is set aside it returns eps: a request that tries them may still get
// through, one that gets none fails for sure.
func (a *aside) filter(s *Snapshot, eps []Endpoint) []Endpoint {
	v := a.view.Load()
	if v == nil || len(eps) == 0 {
		return eps
	}
	rest := v.rest
	if v.seq != s.Seq || len(eps) != len(s.Endpoints) || &eps[0] != &s.Endpoints[0] {
		rest = without(eps, v.set) // a health-filtered list, or another snapshot's
	}
	if len(rest) == 0 {
		return eps
	}
	return rest
}

func (a *aside) stop() {
	a.mu.Lock()
	for d, cancel := range a.probes {
		cancel()
		delete(a.probes, d)
	}
	a.view.Store(nil)
	a.mu.Unlock()
	a.wg.Wait()
}

func without(eps []Endpoint, set map[string]bool) []Endpoint {
	out := make([]Endpoint, 0, len(eps))
	for _, e := range eps {
		if !set[e.Dial] {
			out = append(out, e)
		}
	}
	return out[:len(out):len(out)]
}

func has(eps []Endpoint, dial string) bool {
	for i := range eps {
		if eps[i].Dial == dial {
			return true
		}
	}
	return false
}
