package discovery

import (
	"context"
	"fmt"
	"time"
)

// Which endpoints one request may go to is decided here, and only here: the
// Snapshot's endpoints, those passing health checks, a ramping one left out
// at random during its slow start, none set aside after a failed dial
// (aside.go). Callers translate the result; they do
// not filter it again.

// Endpoints returns the endpoints a request may go to now, sorted. The
// slice is shared: read it, never modify it. It waits for DNS only when the
// Service was never resolved yet, for at most the resolver timeout or until
// ctx ends. The error names the Service and says why there is none: no
// ready endpoints, DNS failing, or (with fail_fast) none healthy.
func (w *Watcher) Endpoints(ctx context.Context) ([]Endpoint, error) {
	s := w.snap.Load()
	if s == nil {
		w.Run() // a request before the config started: look up now
		timeout := w.cfg.Resolver.Timeout
		if s = w.Wait(ctx, timeout); s == nil {
			return nil, fmt.Errorf("service %s: %w within %s", w.cfg.Service, ErrNotResolved, timeout)
		}
	}
	var v *healthView
	var now time.Time // read only for a slow start: the common path skips the clock
	if w.prober != nil {
		// Loaded after the snapshot: publish updates the view first, so v
		// is at least as new as s.
		if v = w.prober.View(); v.ramping() {
			now = time.Now()
		}
	}
	eps, err := selectEndpoints(s, v, now, w.coin)
	return w.aside.filter(s, eps), err
}

// selectEndpoints picks from s by the health view v (nil without health
// checks) at now; coin draws in [0,1) decide the slow start.
func selectEndpoints(s *Snapshot, v *healthView, now time.Time, coin func() float64) ([]Endpoint, error) {
	if len(s.Endpoints) == 0 {
		return nil, s.Unavailable
	}
	if v == nil {
		return s.Endpoints, nil
	}
	eps, ramping := v.endpoints, v.ramping()
	if v.Seq != s.Seq {
		// The view belongs to another DNS answer: take the endpoints of this
		// one that the view finds eligible, so none that left DNS is handed
		// out. (No slow start for the moment until the view catches up.)
		eps, ramping = nil, false
		for _, e := range s.Endpoints {
			if v.IsEligible(e.Dial) {
				eps = append(eps, e)
			}
		}
	}
	switch {
	case len(eps) == 0 && v.FailFast:
		return nil, fmt.Errorf("service %s: none of its %d endpoints passes health checks (fail_fast is set): %w; GET /headless/ shows each one's last error",
			s.Service, len(s.Endpoints), ErrNoneHealthy)
	case len(eps) == 0:
		return s.Endpoints, nil // fail open
	case !ramping || len(eps) == 1 || !now.Before(v.RampUntil):
		return eps, nil
	}
	return thin(v, now, coin), nil
}

// thin leaves each ramping endpoint of v out with the probability 1 - its
// share, which makes it that much less likely to be picked by random, round
// robin or least_conn; at least one endpoint is kept.
func thin(v *healthView, now time.Time, coin func() float64) []Endpoint {
	out := make([]Endpoint, 0, len(v.Eligible))
	for _, e := range v.Eligible {
		if share := v.Share(e, now); share < 1 && coin() >= share {
			continue
		}
		out = append(out, e.Endpoint)
	}
	if len(out) == 0 {
		return v.endpoints
	}
	return out
}
