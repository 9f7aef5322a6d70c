// Package poll is the one polling helper of the plugin's tests: wait until
// a condition holds, or fail the test after a generous bound. A bound, not a
// timing: a slow machine only makes the wait longer, never the test fail
// while the condition is on its way.
package poll

import (
	"runtime"
	"testing"
	"time"
)

// Bound is how long Until waits before it fails the test.
const Bound = 30 * time.Second

// Until polls cond every few milliseconds until it holds, and fails t with
// what (and, if given, explain's words) when it has not held within Bound.
func Until(t testing.TB, what string, cond func() bool, explain ...func() string) {
	t.Helper()
	for deadline := time.Now().Add(Bound); !cond(); time.Sleep(2 * time.Millisecond) {
		if time.Now().After(deadline) {
			msg := ""
			for _, e := range explain {
				msg += "\n" + e()
			}
			t.Fatalf("not within %s: %s%s", Bound, what, msg)
		}
	}
}

// Goroutines waits until no more than base goroutines run; on failure it
// shows every goroutine's stack.
func Goroutines(t testing.TB, base int) {
	t.Helper()
	Until(t, "goroutines back to the baseline", func() bool { return runtime.NumGoroutine() <= base }, func() string {
		buf := make([]byte, 1<<20)
		return string(buf[:runtime.Stack(buf, true)])
	})
}
