package discovery

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

// Which endpoints a request gets, for a snapshot and a health view: health
// filtering, fail open and fail fast, never an endpoint that left DNS, and
// the slow start's draws.
func TestSelectEndpoints(t *testing.T) {
	now := time.Now()
	a, b, c := Endpoint{Dial: "10.0.0.1:80"}, Endpoint{Dial: "10.0.0.2:80"}, Endpoint{Dial: "10.0.0.3:80"}
	snap := func(seq uint64, eps ...Endpoint) *Snapshot {
		return &Snapshot{Service: Service{FQDN: "app.bbs.svc.cluster.local.", Port: 80}, Seq: seq, Endpoints: eps,
			Unavailable: errors.New("service app.bbs.svc.cluster.local:80 has no ready endpoints")}
	}
	// ramping(e, from) is e ramping up from from over an hour.
	type ramping struct {
		e    Endpoint
		from time.Time
	}
	// view(seq, eligible...) is the view of snapshot seq in which the
	// endpoints given (each an Endpoint, or ramping) are eligible.
	view := func(seq uint64, eligible ...any) *healthView {
		v := &healthView{Seq: seq, SlowStart: time.Hour, eligible: map[string]bool{}}
		for _, e := range eligible {
			switch e := e.(type) {
			case Endpoint:
				v.add(e, time.Time{})
			case ramping:
				v.add(e.e, e.from)
			}
		}
		return v
	}
	failFast := view(1)
	failFast.FailFast = true
	half := now.Add(-30 * time.Minute) // halfway through a 1h ramp: share 0.5
	rampOver := view(1, a, ramping{b, half}, c)
	rampOver.RampUntil = now.Add(-time.Second)
	cases := []struct {
		name string
		s    *Snapshot
		v    *healthView
		coin float64
		want string
		err  error
	}{
		{"no health checks", snap(1, a, b, c), nil, 0.99, "10.0.0.1:80 10.0.0.2:80 10.0.0.3:80", nil},
		{"no endpoints", snap(1), nil, 0, "", errors.New("no ready endpoints")},
		{"healthy ones only", snap(1, a, b, c), view(1, a, c), 0, "10.0.0.1:80 10.0.0.3:80", nil},
		{"none healthy: fail open", snap(1, a, b), view(1), 0, "10.0.0.1:80 10.0.0.2:80", nil},
		{"none healthy: fail fast", snap(1, a, b), failFast, 0, "", ErrNoneHealthy},
		// The view was computed for an older answer, which still had a: DNS
		// since dropped it, so it must not be handed out.
		{"left DNS since the view", snap(2, b, c), view(1, a, b), 0, "10.0.0.2:80", nil},
		{"view newer than the snapshot", snap(1, a, b), view(2, b, c), 0, "10.0.0.2:80", nil},
		{"ramp: coin under the share", snap(1, a, b, c), view(1, a, ramping{b, half}, c), 0.4,
			"10.0.0.1:80 10.0.0.2:80 10.0.0.3:80", nil},
		{"ramp: coin over the share", snap(1, a, b, c), view(1, a, ramping{b, half}, c), 0.6,
			"10.0.0.1:80 10.0.0.3:80", nil},
		{"ramp: the share is the ramping one's", snap(1, a, b, c), view(1, ramping{a, half}, b, ramping{c, now.Add(-54 * time.Minute)}), 0.6,
			"10.0.0.2:80 10.0.0.3:80", nil},
		{"ramp over", snap(1, a, b, c), rampOver, 0.99, "10.0.0.1:80 10.0.0.2:80 10.0.0.3:80", nil},
		{"ramp: only one eligible", snap(1, a, b, c), view(1, ramping{b, half}), 0.99, "10.0.0.2:80", nil},
		{"ramp: all ramping, none drawn", snap(1, b, c), view(1, ramping{b, half}, ramping{c, half}), 0.99, "10.0.0.2:80 10.0.0.3:80", nil},
		{"ramp: view of another answer", snap(2, a, b, c), view(1, a, ramping{b, half}, c), 0.99,
			"10.0.0.1:80 10.0.0.2:80 10.0.0.3:80", nil},
	}
	for _, tc := range cases {
		got, err := selectEndpoints(tc.s, tc.v, now, func() float64 { return tc.coin })
		switch {
		case tc.err == nil && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.err != nil && (err == nil || !errors.Is(err, tc.err) && !strings.Contains(err.Error(), tc.err.Error())):
			t.Errorf("%s: error %v, want %v", tc.name, err, tc.err)
		case dials(got) != tc.want:
			t.Errorf("%s: [%s], want [%s]", tc.name, dials(got), tc.want)
		}
	}
}

// No request waits on DNS: once a Service is resolved, asking for its
// endpoints sends no query, with or without health checks; refreshing is
// the watcher's own business.
func TestEndpointsAskNoDNS(t *testing.T) {
	for _, health := range []bool{false, true} {
		// Loopback endpoints: the health checks probe them.
		srv := dnstest.Start(t, "frontend.bbs.svc.cluster.local. 5 IN A 127.0.0.2\nfrontend.bbs.svc.cluster.local. 5 IN A 127.0.0.3")
		w, _ := startWatcher(t, srv, "frontend:8001", func(c *Config) {
			c.IPv6 = false
			c.Addresses.Loopback = true // allowed explicitly: the probes dial them
			if health {
				c.Health = &HealthCheck{TCP: true, Optimistic: true, Interval: time.Hour}
			}
		})
		if _, err := w.Endpoints(context.Background()); err != nil {
			t.Fatalf("health %t: first request: %v", health, err)
		}
		before := srv.Queries()
		for range 1000 {
			// (How many pass depends on what listens there: not the point.)
			if eps, err := w.Endpoints(context.Background()); err != nil || len(eps) == 0 {
				t.Fatalf("health %t: %d endpoints, %v", health, len(eps), err)
			}
		}
		if n := srv.Queries() - before; n != 0 {
			t.Fatalf("health %t: 1,000 requests sent %d DNS queries", health, n)
		}
	}
}

// What a request is handed may be the Snapshot's or the health view's own
// slice, or part of it: its capacity ends at its length, so a caller that
// appends to it gets a copy instead of writing into them.
func TestCandidatesHaveNoSpareCapacity(t *testing.T) {
	eps := make([]Endpoint, 0, 8)
	for i := range 5 {
		eps = append(eps, endpointOf(t, fmt.Sprintf("10.0.0.%d:80", i+1)))
	}
	s := &Snapshot{Endpoints: finish(eps, new(int)), Seq: 1}
	p := startProber(t, HealthCheck{Interval: time.Hour})
	p.run = func(context.Context, Endpoint) error { return nil }
	p.update(s)
	poll.Until(t, "every endpoint healthy", func() bool { return len(p.View().Eligible) == len(s.Endpoints) })
	for _, v := range []*healthView{nil, p.View()} {
		for _, sampler := range []*Sampler{nil, {Pick: PickFirst, Size: 2}, {Pick: PickWindow, Size: 2},
			{Pick: PickRandom, Size: 2}, {Pick: PickFirst, Size: 10}} {
			for range 6 { // the window moves on, and wraps
				got, err := selectEndpoints(s, v, time.Now(), nil)
				if sampler != nil {
					got = sampler.sample(got)
				}
				if err != nil || len(got) == 0 || cap(got) != len(got) {
					t.Fatalf("health %t, sampler %+v: %d endpoints with capacity %d, %v; want no spare capacity",
						v != nil, sampler, len(got), cap(got), err)
				}
			}
		}
	}
}
