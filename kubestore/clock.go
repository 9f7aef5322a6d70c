package kubestore

import "time"

// Clock is the time a Storage measures Leases by and waits on: how long a
// Lease has gone unchanged, the poll of a waiting Lock, the heartbeat of a
// held one. The real clock is the default; its readings are monotonic, so
// a step of the wall clock expires no lock. Tests pass one they move by
// hand, instead of sleeping through lease durations (client-go's leader
// election takes a clock for the same reason).
type Clock interface {
	Now() time.Time
	NewTimer(d time.Duration) Timer
}

// Timer is the part of *time.Timer a Storage uses.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
}

type realClock struct{}

func (realClock) Now() time.Time                 { return time.Now() }
func (realClock) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.Timer.C }

// wait waits d on c, and reports false if done was closed first.
func wait(c Clock, d time.Duration, done <-chan struct{}) bool {
	t := c.NewTimer(d)
	select {
	case <-t.C():
		return true
	case <-done:
		t.Stop()
		return false
	}
}
