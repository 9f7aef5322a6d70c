package discovery

import (
	"testing"
	"time"
)

// The duration histogram counts every lookup in the bucket of its duration.
func TestStatsBuckets(t *testing.T) {
	var st stats
	st.init()
	for _, d := range []time.Duration{300 * time.Microsecond, time.Millisecond, 2 * time.Second, time.Minute} {
		st.lookup(OutcomeSuccess, d, Result{Queries: 2, Truncated: 1})
	}
	st.lookup(OutcomeTimeout, 500*time.Millisecond, Result{})
	s := st.copy()
	want := map[time.Duration]uint64{500 * time.Microsecond: 1, time.Millisecond: 1, 500 * time.Millisecond: 1, 2500 * time.Millisecond: 1}
	for i, ub := range durationBuckets {
		if s.Durations[i] != want[ub] {
			t.Errorf("bucket le=%v holds %d, want %d", ub, s.Durations[i], want[ub])
		}
	}
	if inf := s.Durations[len(durationBuckets)]; inf != 1 || s.LookupCount() != 5 || s.Queries != 8 || s.Truncated != 4 ||
		s.Lookups[OutcomeTimeout] != 1 || s.Lookups[OutcomeSuccess] != 4 {
		t.Errorf("stats %+v", s)
	}
	if s.DurationSum != 300*time.Microsecond+time.Millisecond+2*time.Second+time.Minute+500*time.Millisecond {
		t.Errorf("sum %s", s.DurationSum)
	}
}
