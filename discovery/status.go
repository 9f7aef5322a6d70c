package discovery

import (
	"slices"
	"sync"
	"time"
)

// A Watcher's Status is the one account of its state that every reader
// translates (the admin endpoint into JSON, the metrics into series): what
// DNS said, what the probes say, and what the Watcher has done so far.

// State sums up a Watcher's Snapshot.
type State string

// The States of a Watcher.
const (
	StatePending State = "pending" // no lookup finished yet
	StateOK      State = "ok"      // DNS answered with endpoints
	StateEmpty   State = "empty"   // DNS says there are no ready endpoints
	StateStale   State = "stale"   // lookups fail; the endpoints of an earlier answer are kept
	StateFailing State = "failing" // lookups fail and there are no endpoints
)

// Status is a Watcher's state at one moment.
type Status struct {
	Config Config
	// Snapshot is the last published one; nil while State is StatePending.
	Snapshot *Snapshot
	State    State
	// Health is nil without health checks.
	Health *HealthStatus
	// SetAside are the endpoints set aside after a failed dial, sorted.
	SetAside []string
	Stats    Stats
}

// HealthStatus is what the probes say about a Snapshot's endpoints.
type HealthStatus struct {
	// Endpoints are the Snapshot's endpoints, each with what the probes say
	// of it (State Unknown for one they have not seen yet): a reader walks
	// these instead of the Snapshot's.
	Endpoints []EndpointHealth
	// Eligible counts the endpoints requests may go to: those passing (and,
	// when optimistic, those not probed yet).
	Eligible int
	// Panic is set while endpoints are discovered but none is eligible.
	Panic bool
}

// Stats count what a Watcher did since it started. They belong to the
// Watcher, so they survive every configuration that shares it.
type Stats struct {
	// Lookups counts finished lookups by outcome.
	Lookups map[Outcome]uint64
	// Queries, Truncated and Dropped add up the Results of the lookups;
	// Refused counts the endpoints the AddressPolicy did not allow.
	Queries, Truncated, Dropped, Refused uint64
	// Durations[i] counts the lookups that took at most DurationBuckets()[i]
	// (and longer than the bound before); the last entry counts the rest.
	Durations []uint64
	// DurationSum is the time all lookups took together.
	DurationSum time.Duration
	// Passes and Fails count health probes; ToHealthy and ToUnhealthy the
	// endpoints that changed state (first probes of new endpoints included).
	Passes, Fails, ToHealthy, ToUnhealthy uint64
	// Events counts EndpointSlice watch events that changed a slice,
	// Relists the lists (the first one and each after a 410 Gone),
	// StreamRestarts the watch streams that ended (`via api` only).
	Events, Relists, StreamRestarts uint64
}

// DurationBuckets returns the upper bounds of Stats.Durations (a copy).
func DurationBuckets() []time.Duration { return slices.Clone(durationBuckets) }

// durationBuckets are the upper bounds of Stats.Durations: in-cluster DNS
// answers in about a millisecond; a dead server costs the resolver timeout
// (2s by default) per attempt.
var durationBuckets = []time.Duration{
	500 * time.Microsecond, time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond,
	250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2500 * time.Millisecond,
	5 * time.Second, 10 * time.Second,
}

// LookupCount is the number of lookups, whatever their outcome.
func (s Stats) LookupCount() uint64 {
	var n uint64
	for _, c := range s.Durations {
		n += c
	}
	return n
}

// Add adds the counts of o to s (whose Lookups and Durations must be made).
func (s *Stats) Add(o Stats) {
	for k, n := range o.Lookups {
		s.Lookups[k] += n
	}
	for i, n := range o.Durations {
		s.Durations[i] += n
	}
	s.Queries += o.Queries
	s.Truncated += o.Truncated
	s.Dropped += o.Dropped
	s.Refused += o.Refused
	s.DurationSum += o.DurationSum
	s.Passes += o.Passes
	s.Fails += o.Fails
	s.ToHealthy += o.ToHealthy
	s.ToUnhealthy += o.ToUnhealthy
	s.Events += o.Events
	s.Relists += o.Relists
	s.StreamRestarts += o.StreamRestarts
}

// NewStats returns zero Stats ready for Add.
func NewStats() Stats {
	return Stats{Lookups: make(map[Outcome]uint64, len(outcomes)), Durations: make([]uint64, len(durationBuckets)+1)}
}

// stats is the Watcher's live Stats: the run goroutine and the probes write,
// readers copy. One lock keeps a histogram's buckets and sum consistent.
type stats struct {
	mu sync.Mutex
	s  Stats
}

func (st *stats) init() { st.s = NewStats() }

func (st *stats) lookup(o Outcome, took time.Duration, res Result) {
	b, _ := slices.BinarySearch(durationBuckets, took) // first bound >= took, or the last slot
	st.mu.Lock()
	defer st.mu.Unlock()
	st.s.Lookups[o]++
	st.s.Queries += uint64(max(res.Queries, 0))
	st.s.Truncated += uint64(max(res.Truncated, 0))
	st.s.Dropped += uint64(max(res.Dropped, 0))
	st.s.Refused += uint64(max(res.RefusedCount, 0))
	st.s.Durations[b]++
	st.s.DurationSum += took
}

func (st *stats) check(passed, changed bool, to HealthState) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if passed {
		st.s.Passes++
	} else {
		st.s.Fails++
	}
	switch {
	case changed && to == Healthy:
		st.s.ToHealthy++
	case changed && to == Unhealthy:
		st.s.ToUnhealthy++
	}
}

func (st *stats) copy() Stats {
	st.mu.Lock()
	defer st.mu.Unlock()
	s := NewStats()
	s.Add(st.s)
	return s
}

// Status returns the Watcher's state now.
func (w *Watcher) Status() Status {
	st := Status{Config: w.cfg, State: StatePending, Stats: w.stats.copy()}
	s := w.snap.Load()
	st.Snapshot = s
	if s != nil {
		st.State = stateOf(s)
	}
	if w.prober != nil {
		st.Health = w.prober.status(s)
	}
	st.SetAside = w.SetAsideEndpoints()
	return st
}

func stateOf(s *Snapshot) State {
	switch {
	case s.Err == nil && len(s.Endpoints) > 0:
		return StateOK
	case s.Err == nil:
		return StateEmpty
	case len(s.Endpoints) > 0:
		return StateStale
	}
	return StateFailing
}

// status describes the endpoints of s (nil: none yet) as the probes see them.
func (p *prober) status(s *Snapshot) *HealthStatus {
	v := p.View()
	hs := &HealthStatus{Panic: v.Panic}
	if s == nil {
		return hs
	}
	hs.Endpoints = make([]EndpointHealth, len(s.Endpoints))
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, e := range s.Endpoints {
		if st, ok := p.states[e.Dial]; ok {
			hs.Endpoints[i] = st.EndpointHealth
		}
		hs.Endpoints[i].Endpoint = e // the Snapshot's (the probes' copy may hold an older SRV target)
		if v.IsEligible(e.Dial) {
			hs.Eligible++
		}
	}
	return hs
}
