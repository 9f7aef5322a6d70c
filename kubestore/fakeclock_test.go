package kubestore_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/internal/poll"
	"github.com/caddy-headless/caddy-headless/kubestore"
)

// fakeClock is a kubestore.Clock whose time moves only by Advance; its
// timers fire when Advance reaches their deadline. The lock tests move it
// through lease durations instead of sleeping through them.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers map[*fakeTimer]bool // the armed ones
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), timers: map[*fakeTimer]bool{}}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) kubestore.Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, ch: make(chan time.Time, 1), at: c.now.Add(d)}
	c.timers[t] = true
	c.fireLocked()
	return t
}

// Advance moves the time by d and fires the timers it reaches.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	c.fireLocked()
}

func (c *fakeClock) fireLocked() {
	for t := range c.timers {
		if !t.at.After(c.now) {
			delete(c.timers, t)
			t.ch <- t.at
		}
	}
}

// armed is the number of timers waiting for their deadline.
func (c *fakeClock) armed() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.timers)
}

// waitArmed waits until n timers wait (a heartbeat started, a Lock is
// back on its poll).
func (c *fakeClock) waitArmed(t *testing.T, n int) {
	t.Helper()
	poll.Until(t, fmt.Sprintf("%d timer(s) armed on the fake clock (does the heartbeat or Lock wait on another clock?)", n),
		func() bool { return c.armed() >= n })
}

// step advances d and waits until every timer that fired is armed again:
// the heartbeat it woke has renewed (or failed to) and waits for the next
// renewal, so the test never outruns it.
func (c *fakeClock) step(t *testing.T, d time.Duration) {
	t.Helper()
	n := c.armed()
	c.Advance(d)
	c.waitArmed(t, n)
}

type fakeTimer struct {
	c  *fakeClock
	ch chan time.Time
	at time.Time
}

func (t *fakeTimer) C() <-chan time.Time { return t.ch }

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.c.timers[t]
	delete(t.c.timers, t)
	return was
}
