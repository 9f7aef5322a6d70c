package discovery

import (
	"context"
	"math/rand/v2"
	"sync/atomic"
)

// A proxy that is handed every endpoint for every request does work in
// proportion to their number: it prepares and scans each one. Most load
// balancing policies need only a few of them to decide as well: a uniform
// choice among a few distinct endpoints drawn uniformly is a uniform choice
// among all of them, and the least loaded of two random ones is the "power
// of two choices". A Sampler hands each request those few, so the request
// path costs the same for 1 and for 1,000 endpoints.

// Pick says which of the eligible endpoints a Sampler hands out.
type Pick uint8

const (
	// PickRandom draws distinct endpoints uniformly at random: for
	// policies that choose at random or by load among what they are given.
	PickRandom Pick = iota + 1
	// PickWindow hands out consecutive endpoints, a window that moves on by
	// its own size every Size requests: a proxy rotating through each
	// window's members in turn then rotates through all the endpoints.
	PickWindow
	// PickFirst hands out the first endpoints in order, for a policy that
	// takes the first available one; the others are its fallbacks.
	PickFirst
)

// Candidate counts: DefaultCandidates per request, or PassiveCandidates
// when the proxy itself also marks endpoints down (passive health checks,
// a circuit breaker). Among k candidates drawn from endpoints of which a
// fraction f is marked down, all are down with probability f^k: at
// f = 0.5, 1/4 for 2 and 1/256 for 8. A retry is handed every endpoint.
const (
	DefaultCandidates = 2
	PassiveCandidates = 8
)

// Sampler picks the candidates of one request. Use one per proxy handler:
// it keeps the window's position. A nil *Sampler hands out every endpoint.
type Sampler struct {
	Pick Pick
	// Size is how many endpoints a request gets; all of them when there
	// are not more than Size.
	Size int

	robin atomic.Uint64
	intN  func(int) int // rand.IntN; tests replace it
}

// Candidates returns the endpoints one request may go to (see Endpoints),
// cut down to the sample s picks; every eligible endpoint if s is nil.
// The result may share memory with the Watcher's: read it, never modify it.
func (w *Watcher) Candidates(ctx context.Context, s *Sampler) ([]Endpoint, error) {
	eps, err := w.Endpoints(ctx)
	if err != nil {
		return nil, err
	}
	if s != nil {
		eps = s.sample(eps)
	}
	w.count(eps)
	return eps, nil
}

// sample returns s.Size of eps, chosen the s.Pick way.
func (s *Sampler) sample(eps []Endpoint) []Endpoint {
	n, k := len(eps), s.Size
	if k <= 0 || k >= n {
		return eps
	}
	switch s.Pick {
	case PickFirst:
		return eps[:k:k] // full slice expressions: an append by a caller cannot reach the shared snapshot
	case PickWindow:
		// Requests c = bk … bk+k-1 share the window that starts at bk: a
		// proxy that rotates by one per request visits each member once.
		c := s.robin.Add(1) - 1
		start := int(c / uint64(k) * uint64(k) % uint64(n))
		if start+k <= n {
			return eps[start : start+k : start+k]
		}
		out := make([]Endpoint, 0, k)
		out = append(out, eps[start:]...)
		return append(out, eps[:k-(n-start)]...)
	case PickRandom:
		intN := s.intN
		if intN == nil {
			intN = rand.IntN
		}
		// Floyd's algorithm: k distinct indices with k draws.
		var small [PassiveCandidates]int
		picked := small[:0]
		for j := n - k; j < n; j++ {
			t := intN(j + 1)
			for _, p := range picked {
				if p == t {
					t = j
					break
				}
			}
			picked = append(picked, t)
		}
		out := make([]Endpoint, len(picked))
		for i, p := range picked {
			out[i] = eps[p]
		}
		return out
	}
	return eps
}
