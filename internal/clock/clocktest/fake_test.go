package clocktest

import (
	"testing"
	"time"
)

// fired reports whether tm has sent a time, and which.
func fired(tm interface{ C() <-chan time.Time }) (time.Time, bool) {
	select {
	case at := <-tm.C():
		return at, true
	default:
		return time.Time{}, false
	}
}

func TestTimerFiresAtItsDeadlineNotBefore(t *testing.T) {
	c := NewFake()
	deadline := c.Now().Add(time.Second)
	tm := c.NewTimer(time.Second)
	if !c.ArmedAt(deadline) || c.Armed() != 1 {
		t.Fatalf("a new timer: ArmedAt(deadline) %v, Armed %d; want true, 1", c.ArmedAt(deadline), c.Armed())
	}
	c.Advance(time.Second - time.Nanosecond)
	if _, ok := fired(tm); ok {
		t.Fatal("the timer fired 1ns before its deadline")
	}
	c.Advance(time.Nanosecond)
	at, ok := fired(tm)
	if !ok || !at.Equal(deadline) {
		t.Fatalf("at the deadline: fired %v with %v; want its deadline %v", ok, at, deadline)
	}
	if c.Armed() != 0 || c.ArmedAt(deadline) {
		t.Fatalf("a fired timer still counts as armed (Armed %d)", c.Armed())
	}
	c.Advance(time.Hour)
	if _, ok := fired(tm); ok {
		t.Fatal("the timer fired twice")
	}
}

func TestTimerWithNoDurationFiresAtOnce(t *testing.T) {
	c := NewFake()
	for _, d := range []time.Duration{0, -time.Second} {
		tm := c.NewTimer(d)
		if _, ok := fired(tm); !ok {
			t.Fatalf("NewTimer(%v) did not fire at once", d)
		}
		if tm.Reset(d); c.Armed() != 0 {
			t.Fatalf("Reset(%v) left the timer armed", d)
		}
		if _, ok := fired(tm); !ok {
			t.Fatalf("Reset(%v) did not fire at once", d)
		}
	}
}

// Stop and Reset answer as *time.Timer's do (Go 1.23 on): true while the
// timer was still to deliver a time, armed or fired but not received, and
// no stale time is received after them.
func TestStopAndResetReportLikeTimeTimer(t *testing.T) {
	c := NewFake()
	tm := c.NewTimer(time.Second)
	if !tm.Stop() {
		t.Fatal("Stop of an armed timer: false; want true")
	}
	if tm.Stop() {
		t.Fatal("Stop of a stopped timer: true; want false")
	}
	c.Advance(time.Hour)
	if _, ok := fired(tm); ok {
		t.Fatal("a stopped timer fired")
	}

	if tm.Reset(time.Second) {
		t.Fatal("Reset of a stopped timer: true; want false")
	}
	if !tm.Reset(2 * time.Second) {
		t.Fatal("Reset of an armed timer: false; want true")
	}
	if !c.ArmedAt(c.Now().Add(2*time.Second)) || c.Armed() != 1 {
		t.Fatal("Reset did not move the deadline")
	}
	c.Advance(time.Second)
	if _, ok := fired(tm); ok {
		t.Fatal("the timer fired at its deadline from before Reset")
	}

	c.Advance(time.Second) // fires; nobody receives
	if !tm.Reset(time.Second) {
		t.Fatal("Reset of a fired timer whose time was not received: false; want true")
	}
	if _, ok := fired(tm); ok {
		t.Fatal("after Reset, the time from before it was received")
	}
	c.Advance(time.Second) // fires again; nobody receives
	if !tm.Stop() {
		t.Fatal("Stop of a fired timer whose time was not received: false; want true")
	}
	if _, ok := fired(tm); ok {
		t.Fatal("after Stop, the time from before it was received")
	}

	tm.Reset(time.Second)
	c.Advance(time.Second)
	if _, ok := fired(tm); !ok {
		t.Fatal("a re-armed timer did not fire")
	}
	if tm.Stop() || tm.Reset(time.Second) {
		t.Fatal("Stop or Reset after the time was received: true; want false")
	}
}

func TestAdvanceFiresEveryReachedTimer(t *testing.T) {
	c := NewFake()
	start := c.Now()
	var timers []interface{ C() <-chan time.Time }
	for _, d := range []time.Duration{3 * time.Second, time.Second, 2 * time.Second, 2 * time.Second, 5 * time.Second} {
		timers = append(timers, c.NewTimer(d))
	}
	c.Advance(3 * time.Second)
	for i, want := range []time.Duration{3 * time.Second, time.Second, 2 * time.Second, 2 * time.Second} {
		if at, ok := fired(timers[i]); !ok || !at.Equal(start.Add(want)) {
			t.Fatalf("timer %d: fired %v with %v; want its deadline %v", i, ok, at, start.Add(want))
		}
	}
	if _, ok := fired(timers[4]); ok || c.Armed() != 1 {
		t.Fatalf("the timer 5s out fired at 3s, or Armed is %d; want 1", c.Armed())
	}
}

// WaitArmed and Step wait for a loop to be back on its timer.
func TestStepWaitsForTheLoopToWaitAgain(t *testing.T) {
	c := NewFake()
	ticks := make(chan time.Time, 3)
	stop := make(chan struct{})
	defer close(stop)
	go func() { // a heartbeat every second, like a held lock's
		for {
			tm := c.NewTimer(time.Second)
			select {
			case at := <-tm.C():
				ticks <- at
			case <-stop:
				tm.Stop()
				return
			}
		}
	}()
	c.WaitArmed(t, 1)
	start := c.Now()
	for i := 1; i <= 3; i++ {
		c.Step(t, time.Second)
		if len(ticks) != 1 {
			t.Fatalf("step %d: Step returned with %d ticks sent; want the loop to have ticked once and to wait again", i, len(ticks))
		}
		if at, want := <-ticks, start.Add(time.Duration(i)*time.Second); !at.Equal(want) {
			t.Fatalf("tick %d at %v; want %v", i, at, want)
		}
	}
}
