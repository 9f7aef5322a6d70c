package discovery

import (
	"fmt"
	"math"
	"slices"
	"testing"
)

func endpointsN(n int) []Endpoint {
	eps := make([]Endpoint, n)
	for i := range eps {
		eps[i] = Endpoint{Dial: fmt.Sprintf("10.9.%d.%d:80", i/250, i%250+1)}
	}
	return eps
}

// Each Pick hands out Size distinct endpoints of those given, and all of
// them when there are not more.
func TestSamplerPicks(t *testing.T) {
	eps := endpointsN(10)
	for _, tc := range []struct {
		name string
		s    *Sampler
		want []string // one line per request
	}{
		{"first", &Sampler{Pick: PickFirst, Size: 3}, []string{"0 1 2", "0 1 2"}},
		// The window moves on by its size every Size requests, and wraps.
		{"window", &Sampler{Pick: PickWindow, Size: 4}, []string{"0 1 2 3", "0 1 2 3", "0 1 2 3", "0 1 2 3",
			"4 5 6 7", "4 5 6 7", "4 5 6 7", "4 5 6 7", "8 9 0 1", "8 9 0 1", "8 9 0 1", "8 9 0 1", "2 3 4 5"}},
		{"size over n", &Sampler{Pick: PickRandom, Size: 20}, []string{"0 1 2 3 4 5 6 7 8 9"}},
		{"size 0", &Sampler{Pick: PickRandom}, []string{"0 1 2 3 4 5 6 7 8 9"}},
		// Floyd's draws: j = 7: IntN(8) → 7; j = 8: IntN(9) → 7 (taken) → 8;
		// j = 9: IntN(10) → 0.
		{"random", &Sampler{Pick: PickRandom, Size: 3, intN: seq(7, 7, 0)}, []string{"7 8 0"}},
	} {
		for i, want := range tc.want {
			got := tc.s.sample(eps)
			var idx []string
			for _, e := range got {
				idx = append(idx, fmt.Sprint(slices.IndexFunc(eps, func(x Endpoint) bool { return x == e })))
			}
			if g := fmt.Sprint(idx); g != "["+want+"]" {
				t.Errorf("%s: request %d got %s, want [%s]", tc.name, i, g, want)
			}
		}
	}
}

func seq(vals ...int) func(int) int {
	return func(n int) int {
		v := vals[0]
		vals = vals[1:]
		if v >= n {
			panic(fmt.Sprintf("draw %d out of [0,%d)", v, n))
		}
		return v
	}
}

// Random samples are distinct and uniform: over 100,000 requests of 2
// candidates out of 1,000 endpoints, each endpoint is drawn Binomial(n =
// 100,000, p = 2/1,000) times: mean 200, σ ≈ 14.1. The bound is 6σ either
// side: the chance that any of the 1,000 counts falls outside by luck is
// below 1,000 · 2e-9.
func TestSamplerRandomIsUniform(t *testing.T) {
	const n, k, requests = 1000, 2, 100_000
	eps := endpointsN(n)
	index := map[string]int{}
	for i, e := range eps {
		index[e.Dial] = i
	}
	count := make([]int, n)
	s := &Sampler{Pick: PickRandom, Size: k}
	for range requests {
		got := s.sample(eps)
		if len(got) != k || got[0] == got[1] {
			t.Fatalf("sample %v: want %d distinct", got, k)
		}
		for _, e := range got {
			count[index[e.Dial]]++
		}
	}
	p := float64(k) / n
	mean, sigma := requests*p, math.Sqrt(requests*p*(1-p))
	lo, hi := slices.Min(count), slices.Max(count)
	if float64(lo) < mean-6*sigma || float64(hi) > mean+6*sigma {
		t.Fatalf("draws per endpoint %d…%d, want within %.0f±%.0f", lo, hi, mean, 6*sigma)
	}
}

// The window, under a proxy that rotates by one per request (Caddy's
// round_robin), visits every endpoint equally often, whatever the phase of
// the proxy's own counter.
func TestSamplerWindowRotatesOverAll(t *testing.T) {
	for _, tc := range []struct{ n, k, phase int }{{10, 2, 0}, {10, 2, 1}, {10, 3, 2}, {1000, 8, 5}} {
		eps := endpointsN(tc.n)
		s := &Sampler{Pick: PickWindow, Size: tc.k}
		count := map[string]int{}
		robin := tc.phase
		rounds := tc.n * tc.k * 3
		for range rounds {
			got := s.sample(eps)
			robin++
			count[got[robin%len(got)].Dial]++
		}
		for _, e := range eps {
			if c := count[e.Dial]; c != rounds/tc.n {
				t.Errorf("n=%d k=%d phase %d: %s got %d of %d requests, want %d", tc.n, tc.k, tc.phase, e.Dial, c, rounds, rounds/tc.n)
				break
			}
		}
	}
}

// A sample shares memory with the snapshot, but none of its spare capacity:
// appending to it must not write into the endpoints every request reads.
func TestSampleHasNoSpareCapacity(t *testing.T) {
	eps := make([]Endpoint, 10)
	for i := range eps {
		eps[i].Dial = fmt.Sprint(i)
	}
	for _, s := range []*Sampler{{Pick: PickFirst, Size: 3}, {Pick: PickWindow, Size: 3}} {
		got := s.sample(eps)
		if cap(got) != len(got) {
			t.Errorf("pick %d: sample of %d has capacity %d: an append would overwrite the snapshot", s.Pick, len(got), cap(got))
		}
	}
}
