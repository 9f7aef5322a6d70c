// Package clock is the time the plugin's background loops read and wait
// on, behind an interface so that tests move time instead of sleeping
// through it (client-go's leader election takes a clock for the same
// reason). Code takes a Clock, Real unless a test sets another;
// clocktest.Fake is the one tests move by hand.
package clock

import "time"

// Clock tells the time and makes timers.
type Clock interface {
	Now() time.Time
	NewTimer(d time.Duration) Timer
}

// Timer is the part of *time.Timer the loops use, with its meaning (Go
// 1.23 on): Stop and Reset report whether the timer was still to deliver a
// time, and leave no stale time in C.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
	Reset(d time.Duration) bool
}

// Real is the clock of time.Now and time.NewTimer. Its readings are
// monotonic, so a step of the wall clock moves no deadline.
type Real struct{}

func (Real) Now() time.Time                 { return time.Now() }
func (Real) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.Timer.C }
