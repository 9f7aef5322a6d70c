// Package clocktest has the clock tests move by hand, so that they step
// through refresh gaps and lease durations instead of sleeping through
// them, and nothing they assert depends on how fast the machine is.
package clocktest

import (
	"cmp"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/internal/clock"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

// Fake is a clock.Clock whose time moves only by Advance; a timer fires
// (sends its deadline on C) when Advance reaches its deadline, or at once
// if made or reset with d <= 0. Its timers behave like *time.Timer: Stop
// and Reset discard a time not yet received and report true for it.
type Fake struct {
	mu    sync.Mutex
	now   time.Time
	made  uint64              // timers made, for the firing order
	armed map[*fakeTimer]bool // the timers waiting for their deadline
}

// NewFake returns a Fake at 2026-01-01 00:00 UTC.
func NewFake() *Fake {
	return &Fake{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), armed: map[*fakeTimer]bool{}}
}

var _ clock.Clock = (*Fake)(nil)

func (c *Fake) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *Fake) NewTimer(d time.Duration) clock.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.made++
	t := &fakeTimer{c: c, ch: make(chan time.Time, 1), seq: c.made}
	t.armLocked(d)
	return t
}

// Advance moves the time by d and fires every timer it reaches, the
// earliest deadline first.
func (c *Fake) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	var due []*fakeTimer
	for t := range c.armed {
		if !t.at.After(c.now) {
			due = append(due, t)
		}
	}
	slices.SortFunc(due, func(a, b *fakeTimer) int {
		return cmp.Or(a.at.Compare(b.at), cmp.Compare(a.seq, b.seq))
	})
	for _, t := range due {
		t.fireLocked()
	}
}

// Armed is the number of timers waiting for their deadline.
func (c *Fake) Armed() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.armed)
}

// ArmedAt reports whether a timer waits for exactly at.
func (c *Fake) ArmedAt(at time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for t := range c.armed {
		if t.at.Equal(at) {
			return true
		}
	}
	return false
}

// WaitArmed waits until at least n timers wait for their deadline: the
// code under test has come back to its wait (a heartbeat started, a Lock
// is on its poll).
func (c *Fake) WaitArmed(t testing.TB, n int) {
	t.Helper()
	poll.Until(t, fmt.Sprintf("%d timer(s) armed on the fake clock (does the code under test wait on another clock?)", n),
		func() bool { return c.Armed() >= n })
}

// Step advances d and waits until as many timers are armed as before:
// the loops it woke have done their work and wait again, so the test
// never outruns them.
func (c *Fake) Step(t testing.TB, d time.Duration) {
	t.Helper()
	n := c.Armed()
	c.Advance(d)
	c.WaitArmed(t, n)
}

type fakeTimer struct {
	c   *Fake
	ch  chan time.Time
	seq uint64
	at  time.Time // the deadline, while armed
}

func (t *fakeTimer) C() <-chan time.Time { return t.ch }

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	return t.disarmLocked()
}

func (t *fakeTimer) Reset(d time.Duration) bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.disarmLocked()
	t.armLocked(d)
	return was
}

// disarmLocked stops t and drops a time it sent that nobody received yet;
// it reports whether there was either.
func (t *fakeTimer) disarmLocked() bool {
	was := t.c.armed[t]
	delete(t.c.armed, t)
	select {
	case <-t.ch:
		was = true
	default:
	}
	return was
}

func (t *fakeTimer) armLocked(d time.Duration) {
	t.at = t.c.now.Add(d)
	t.c.armed[t] = true
	if d <= 0 {
		t.fireLocked()
	}
}

func (t *fakeTimer) fireLocked() {
	delete(t.c.armed, t)
	select {
	case t.ch <- t.at:
	default: // cannot happen: arming t empties its channel
		panic("clocktest: a timer fired while its last time was still unreceived")
	}
}
