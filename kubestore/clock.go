package kubestore

import (
	"time"

	"github.com/caddy-headless/caddy-headless/internal/clock"
)

// Clock is the clock of Config.Clock: the one internal/clock defines for
// every background loop of the plugin, named here so that callers outside
// the module can pass one.
type Clock = clock.Clock

// Timer is what a Clock's NewTimer returns: the part of *time.Timer a
// Storage uses.
type Timer = clock.Timer

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
