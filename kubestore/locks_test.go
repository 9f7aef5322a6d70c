package kubestore_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-headless/caddy-headless/internal/clock/clocktest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
	"github.com/caddy-headless/caddy-headless/kubestore"
	"github.com/caddy-headless/caddy-headless/kubestore/kubetest"
)

// TestLostLockIsLoggedAndNotFreed: another replica takes the Lease while we
// hold it. The heartbeat finds out, logs an error naming the lock and the
// new holder, and Unlock reports the loss and leaves the Lease alone.
func TestLostLockIsLoggedAndNotFreed(t *testing.T) {
	api := kubetest.New(t, "caddy")
	core, logs := observer.New(zap.InfoLevel)
	clk := clocktest.NewFake()
	cfg := api.Config("caddy")
	cfg.Clock = clk
	s := mustNew(t, cfg, zap.New(core))
	ctx := context.Background()
	const lock = "issue_cert_lost.example.com"
	if err := s.Lock(ctx, lock); err != nil {
		t.Fatal(err)
	}
	clk.WaitArmed(t, 1) // the heartbeat
	leases := api.LeaseNames("caddy")
	if len(leases) != 1 {
		t.Fatalf("Leases after one Lock: %q", leases)
	}
	lease := leases[0]
	// Another replica takes the Lease over.
	api.Mutate("caddy", "leases", lease, func(o map[string]any) { o["spec"].(map[string]any)["holderIdentity"] = "intruder/1" })
	clk.Advance(cfg.RenewInterval) // the next renewal finds out
	poll.Until(t, "the heartbeat logs the lost lock", func() bool { return logs.FilterMessageSnippet("lock lost").Len() > 0 })
	lost := logs.FilterMessageSnippet("lock lost").All()
	if len(lost) != 1 || lost[0].Level != zap.ErrorLevel {
		t.Fatalf("want one error \"lock lost\", got %v", logs.All())
	}
	fields := lost[0].ContextMap()
	if fields["lock"] != lock || fields["new_holder"] != "intruder/1" {
		t.Fatalf("the error does not name the lock and the new holder: %v", fields)
	}
	if err := s.Unlock(ctx, lock); !errors.Is(err, kubestore.ErrLockLost) {
		t.Fatalf("Unlock of a lost lock: %v, want ErrLockLost", err)
	}
	if h := api.LeaseHolder("caddy", lease); h != "intruder/1" {
		t.Fatalf("after the late Unlock the Lease holder is %q, want the new holder's to be left alone", h)
	}
}

// TestOutageDoesNotCountAsStaleness: the apiserver answers nothing for
// longer than lease_duration, so the holder cannot renew. A waiter that
// polled through the outage must not take the lock at its first read
// afterwards: it did not watch the Lease go unrenewed, it watched nothing.
func TestOutageDoesNotCountAsStaleness(t *testing.T) {
	api, cfg, clk, holder, waiter := twoReplicas(t, nil)
	ctx := context.Background()
	if err := holder.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	clk.WaitArmed(t, 1) // the heartbeat
	if ok, err := waiter.TryLock(ctx, "l"); ok || err != nil {
		t.Fatalf("TryLock of a live lock = %v, %v", ok, err)
	}
	api.SetDown(true)
	for waited := time.Duration(0); waited < cfg.LeaseDuration+500*time.Millisecond; waited += 100 * time.Millisecond {
		if ok, _ := waiter.TryLock(ctx, "l"); ok {
			t.Fatal("TryLock succeeded while the apiserver was down")
		}
		clk.Step(t, 100*time.Millisecond) // the holder's renewals fail meanwhile
	}
	api.SetDown(false)
	if ok, err := waiter.TryLock(ctx, "l"); ok || err != nil {
		t.Fatalf("first TryLock after the outage = %v, %v: the outage was counted as the holder's silence", ok, err)
	}
	if err := holder.Unlock(ctx, "l"); err != nil {
		t.Fatalf("the holder's Unlock after the outage: %v", err)
	}
}

// leftByDeadHolder has gone take lock "l" and then lose its Lease to
// "dead/1", a holder nobody renews it for; it returns the Lease's name.
func leftByDeadHolder(t *testing.T, api *kubetest.API, gone *kubestore.Storage) string {
	t.Helper()
	ctx := context.Background()
	if err := gone.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	lease := api.LeaseNames("caddy")[0]
	api.Mutate("caddy", "leases", lease, func(o map[string]any) { o["spec"].(map[string]any)["holderIdentity"] = "dead/1" })
	if err := gone.Unlock(ctx, "l"); !errors.Is(err, kubestore.ErrLockLost) {
		t.Fatalf("Unlock of a lock taken by dead/1: %v, want ErrLockLost", err)
	}
	return lease
}

// TestTakeoverRaceHasOneWinner: a Lease is left by a holder that is gone.
// As this replica takes it over, another replica's takeover lands first.
// The takeover carries the resourceVersion it read, so this one gets 409
// and reports "not taken": never two holders.
func TestTakeoverRaceHasOneWinner(t *testing.T) {
	api, cfg, clk, gone, waiter := twoReplicas(t, nil)
	ctx := context.Background()
	lease := leftByDeadHolder(t, api, gone)
	var mu sync.Mutex
	raced := false
	api.BeforeRequest(func(verb, resource, name string) {
		mu.Lock()
		defer mu.Unlock()
		if verb == "update" && resource == "leases" && !raced {
			raced = true
			api.Mutate("caddy", "leases", lease, func(o map[string]any) { o["spec"].(map[string]any)["holderIdentity"] = "other/1" })
		}
	})
	// The waiter polls; the Lease is stale once it has seen it unchanged
	// for lease_duration on its clock, not a poll sooner or later.
	for unchanged := time.Duration(0); ; unchanged += cfg.PollInterval {
		ok, err := waiter.TryLock(ctx, "l")
		mu.Lock()
		done := raced
		mu.Unlock()
		if done {
			if ok || err != nil {
				t.Fatalf("TryLock that lost the takeover race = %v, %v; want false, nil", ok, err)
			}
			if unchanged < cfg.LeaseDuration {
				t.Fatalf("the waiter took the Lease over after watching it unchanged for %v, before lease_duration (%v)", unchanged, cfg.LeaseDuration)
			}
			break
		}
		if ok || err != nil {
			t.Fatalf("TryLock of a Lease not yet stale = %v, %v", ok, err)
		}
		if unchanged >= cfg.LeaseDuration {
			t.Fatalf("the waiter watched the Lease unchanged for %v on its clock and did not take it over (lease_duration %v)", unchanged, cfg.LeaseDuration)
		}
		clk.Advance(cfg.PollInterval)
	}
	if h := api.LeaseHolder("caddy", lease); h != "other/1" {
		t.Fatalf("after the race the Lease holder is %q, want the winner other/1", h)
	}
}

// TestLockTakesOverAfterLeaseDuration: the holder of a Lease is gone (nobody
// renews it). A waiting Lock looks every poll_interval on its clock and
// takes the lock once it has watched the Lease unchanged for lease_duration:
// not a poll sooner, and within one poll after.
func TestLockTakesOverAfterLeaseDuration(t *testing.T) {
	api, cfg, clk, gone, waiter := twoReplicas(t, nil)
	ctx := context.Background()
	lease := leftByDeadHolder(t, api, gone)
	done := make(chan error, 1)
	go func() { done <- waiter.Lock(ctx, "l") }()
	var unchanged time.Duration
	for api.LeaseHolder("caddy", lease) == "dead/1" {
		if unchanged > cfg.LeaseDuration+cfg.PollInterval {
			t.Fatalf("Lock watched the Lease unchanged for %v on its clock and did not take it over (lease_duration %v)", unchanged, cfg.LeaseDuration)
		}
		// Lock has read the Lease and waits for its next poll, or has
		// taken the lock (and its heartbeat waits).
		clk.WaitArmed(t, 1)
		if api.LeaseHolder("caddy", lease) != "dead/1" {
			break
		}
		clk.Advance(cfg.PollInterval)
		unchanged += cfg.PollInterval
	}
	if err := <-done; err != nil {
		t.Fatalf("Lock of a Lease whose holder is gone: %v", err)
	}
	if unchanged < cfg.LeaseDuration {
		t.Fatalf("Lock took the Lease over after watching it unchanged for %v, before lease_duration (%v)", unchanged, cfg.LeaseDuration)
	}
	if h := api.LeaseHolder("caddy", lease); !strings.HasPrefix(h, "waiter/") {
		t.Fatalf("Lease holder %q after the takeover, want the waiter's", h)
	}
	if err := waiter.Unlock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
}

// TestHeldLockOutlivesTheLockContext: certmagic's Lock context may end
// long before Unlock (the ACME retry loop holds issue_cert_* for days).
// The heartbeat does not depend on it: for more than lease_duration after
// the context ended, another replica still cannot take the lock.
func TestHeldLockOutlivesTheLockContext(t *testing.T) {
	_, cfg, clk, holder, waiter := twoReplicas(t, nil)
	lockCtx, cancel := context.WithCancel(context.Background())
	if err := holder.Lock(lockCtx, "issue_cert_long.example.com"); err != nil {
		t.Fatal(err)
	}
	clk.WaitArmed(t, 1) // the heartbeat
	cancel()
	ctx := context.Background()
	for waited := time.Duration(0); waited < cfg.LeaseDuration*3/2+500*time.Millisecond; waited += 50 * time.Millisecond {
		if ok, err := waiter.TryLock(ctx, "issue_cert_long.example.com"); ok || err != nil {
			t.Fatalf("TryLock after the holder's Lock context ended = %v, %v: the heartbeat stopped with the context", ok, err)
		}
		clk.Step(t, 50*time.Millisecond)
	}
	if err := holder.Unlock(ctx, "issue_cert_long.example.com"); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
}

// TestHeldLocksSurviveReprovisioning: a Caddy config reload provisions a
// new Storage with the same config while a lock is held. The new one knows
// the lock as this process's: its TryLock waits like any other caller's,
// and it can release it.
func TestHeldLocksSurviveReprovisioning(t *testing.T) {
	api := kubetest.New(t, "caddy")
	cfg := api.Config("caddy")
	before := mustNew(t, cfg, nil)
	ctx := context.Background()
	if err := before.Lock(ctx, "issue_cert_reload.example.com"); err != nil {
		t.Fatal(err)
	}
	after := mustNew(t, cfg, nil) // the reload
	if ok, err := after.TryLock(ctx, "issue_cert_reload.example.com"); ok || err != nil {
		t.Fatalf("TryLock of the held lock from the reloaded storage = %v, %v", ok, err)
	}
	if err := after.Unlock(ctx, "issue_cert_reload.example.com"); err != nil {
		t.Fatalf("Unlock from the reloaded storage: %v", err)
	}
	if n := len(api.LeaseNames("caddy")); n != 0 {
		t.Fatalf("%d Leases after Unlock, want 0", n)
	}
}

// TestWallClockStepsDoNotExpireLocks: the waiter's wall clock jumps an
// hour forward at every reading (NTP steps, a resumed VM). Staleness is
// measured on the Storage's Clock (monotonic), not on the wall clock it
// writes into Leases, so a live holder keeps its lock.
func TestWallClockStepsDoNotExpireLocks(t *testing.T) {
	var steps atomic.Int64
	_, cfg, clk, holder, waiter := twoReplicas(t, func(c *kubestore.Config) {
		now := c.Clock.Now
		c.Now = func() time.Time { return now().Add(time.Duration(steps.Add(1)) * time.Hour).Round(0) }
	})
	ctx := context.Background()
	if err := holder.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	clk.WaitArmed(t, 1) // the heartbeat
	for waited := time.Duration(0); waited < cfg.LeaseDuration*3/2; waited += cfg.PollInterval {
		if ok, err := waiter.TryLock(ctx, "l"); ok || err != nil {
			t.Fatalf("TryLock of a live lock by a replica whose wall clock steps = %v, %v", ok, err)
		}
		clk.Step(t, cfg.PollInterval)
	}
	if err := holder.Unlock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
}

// TestTryLockDoesNotWait: TryLock of a live holder's lock looks once (one
// read of the Lease) and reports false; it never polls for the holder.
func TestTryLockDoesNotWait(t *testing.T) {
	api, _, _, holder, other := twoReplicas(t, nil)
	ctx := context.Background()
	if err := holder.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var reads []string
	api.BeforeRequest(func(verb, resource, name string) {
		if resource == "leases" && verb == "get" {
			mu.Lock()
			reads = append(reads, name)
			mu.Unlock()
		}
	})
	ok, err := other.TryLock(ctx, "l")
	api.BeforeRequest(nil)
	if ok || err != nil {
		t.Fatalf("TryLock of a held lock = %v, %v; want false, nil", ok, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(reads) != 1 {
		t.Fatalf("TryLock of a held lock read the Lease %d times, want once (no waiting)", len(reads))
	}
	if err := holder.Unlock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
}

// twoReplicas starts a fake apiserver and two storages on it, replica-a and
// waiter, on one fake clock (edit, if set, changes the waiter's config);
// cfg is replica-a's.
func twoReplicas(t *testing.T, edit func(*kubestore.Config)) (api *kubetest.API, cfg kubestore.Config, clk *clocktest.Fake, first, second *kubestore.Storage) {
	t.Helper()
	api = kubetest.New(t, "caddy")
	clk = clocktest.NewFake()
	cfg = api.Config("caddy")
	cfg.Clock = clk
	first = mustNew(t, cfg, nil)
	c := cfg
	c.Identity = "waiter"
	if edit != nil {
		edit(&c)
	}
	return api, cfg, clk, first, mustNew(t, c, nil)
}

// TestHeartbeatSurvivesAPanic: a bug in one renewal (here the clock panics)
// is logged with its stack and does not end the heartbeat nor the process:
// the lock stays held, and another replica cannot take it.
func TestHeartbeatSurvivesAPanic(t *testing.T) {
	api := kubetest.New(t, "caddy")
	clk := clocktest.NewFake()
	cfg := api.Config("caddy")
	cfg.Clock = clk
	var panicNext atomic.Bool
	cfg.Now = func() time.Time {
		if panicNext.CompareAndSwap(true, false) {
			panic("test: a bug in the heartbeat")
		}
		return clk.Now()
	}
	core, logs := observer.New(zap.ErrorLevel)
	holder := mustNew(t, cfg, zap.New(core))
	c := api.Config("caddy")
	c.Identity, c.Clock = "waiter", clk
	waiter := mustNew(t, c, nil)
	ctx := context.Background()
	if err := holder.Lock(ctx, "issue_cert_panic.example.com"); err != nil {
		t.Fatal(err)
	}
	clk.WaitArmed(t, 1) // the heartbeat
	panicNext.Store(true)
	clk.Step(t, cfg.RenewInterval) // the renewal that panics, and the heartbeat armed again
	if logs.FilterMessageSnippet("heartbeat panicked").Len() == 0 {
		t.Fatal("the heartbeat never ran into the panic")
	}
	entry := logs.FilterMessageSnippet("heartbeat panicked").All()[0]
	if _, ok := entry.ContextMap()["stack"]; !ok {
		t.Errorf("the panic was logged without its stack: %v", entry.ContextMap())
	}
	for waited := time.Duration(0); waited < cfg.LeaseDuration*3/2+500*time.Millisecond; waited += 50 * time.Millisecond {
		if ok, err := waiter.TryLock(ctx, "issue_cert_panic.example.com"); ok || err != nil {
			t.Fatalf("TryLock after the heartbeat panicked = %v, %v: the heartbeat stopped renewing", ok, err)
		}
		clk.Step(t, 50*time.Millisecond)
	}
	if err := holder.Unlock(ctx, "issue_cert_panic.example.com"); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
}
