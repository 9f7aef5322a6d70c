package discovery

import (
	"context"
	"testing"
)

// The counts an operator reads in /headless/ cost each request one atomic
// add for the Service and one map lookup and add per candidate; this is
// that cost, beside the same request path without it.
//
//	go test -run '^$' -bench BenchmarkCandidatesCounting ./discovery/
func BenchmarkCandidatesCounting(b *testing.B) {
	for _, n := range []int{1, 1000} {
		w := splitWatcher(&testing.T{}, "bench", 1, n, -1)
		s := &Sampler{Pick: PickRandom, Size: 2}
		ctx := context.Background()
		b.Run("uncounted/"+itoa(n), func(b *testing.B) {
			for b.Loop() {
				eps, _ := w.Endpoints(ctx)
				_ = s.sample(eps)
			}
		})
		b.Run("counted/"+itoa(n), func(b *testing.B) {
			for b.Loop() {
				_, _ = w.Candidates(ctx, s)
			}
		})
		w.Stop()
	}
}

func itoa(n int) string {
	if n == 1 {
		return "1"
	}
	return "1000"
}

// Per-endpoint counts follow the DNS answer: a new answer keeps the counts
// of the endpoints that stay and forgets those that left.
func TestTrafficFollowsAnswer(t *testing.T) {
	w := splitWatcher(t, "t", 1, 3, -1)
	ctx := context.Background()
	for range 5 {
		if _, err := w.Candidates(ctx, nil); err != nil {
			t.Fatal(err)
		}
	}
	old := w.snap.Load()
	w.snap.Store(&Snapshot{Service: old.Service, Endpoints: append([]Endpoint{}, old.Endpoints[1:]...), Seq: 2})
	tr := w.Traffic()
	if tr.Requests != 5 || len(tr.ByEndpoint) != 2 || tr.ByEndpoint["10.1.0.2:80"] != 5 || tr.ByEndpoint["10.1.0.3:80"] != 5 {
		t.Fatalf("traffic %+v; want 5 requests, the 2 endpoints left with 5 each", tr)
	}
	// The same endpoints again, in a new answer: the counts go on.
	w.snap.Store(&Snapshot{Service: old.Service, Endpoints: append([]Endpoint{}, old.Endpoints[1:]...), Seq: 3})
	if _, err := w.Candidates(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if tr := w.Traffic(); tr.ByEndpoint["10.1.0.2:80"] != 6 || tr.ByEndpoint["10.1.0.3:80"] != 6 {
		t.Fatalf("traffic %+v after the same answer again; want 6 each", tr)
	}
}
