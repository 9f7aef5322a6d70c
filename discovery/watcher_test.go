package discovery

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/clock/clocktest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

func startWatcher(t *testing.T, srv *dnstest.Server, ref string, tune func(*Config)) (*Watcher, *observer.ObservedLogs) {
	t.Helper()
	svc, err := ParseService(ref, Defaults{Namespace: "bbs"})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Service: svc, IPv4: true, IPv6: true,
		Resolver:   &Resolver{Servers: []string{srv.Addr}, Timeout: 200 * time.Millisecond},
		RefreshMin: time.Hour, RefreshMax: time.Hour, // tests drive refreshes with RefreshNow
	}
	if tune != nil {
		tune(&cfg)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	w := Start(cfg, zap.New(core))
	t.Cleanup(w.Stop)
	return w, logs
}

func refreshNow(t *testing.T, w *Watcher) *Snapshot {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := w.RefreshNow(ctx)
	if err != nil {
		t.Fatalf("RefreshNow: %v", err)
	}
	return s
}

func TestWatcherFollowsDNS(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	w, logs := startWatcher(t, srv, "frontend:8001", nil)

	s := w.Wait(context.Background(), 5*time.Second)
	if s == nil || dials(s.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001" || s.Outcome != OutcomeSuccess || s.Stale() {
		t.Fatalf("first snapshot %+v", s)
	}

	// Scale out.
	srv.MustSet(t, bbsZone+"frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.4\n")
	if s = refreshNow(t, w); dials(s.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001 10.1.0.4:8001" {
		t.Fatalf("after scale-out: [%s]", dials(s.Endpoints))
	}
	changed := logs.FilterMessage("endpoints changed").All()
	last := changed[len(changed)-1].ContextMap()
	if got := last["added"]; len(got.([]any)) != 1 || got.([]any)[0] != "10.1.0.4:8001" {
		t.Fatalf("change log %v; want added [10.1.0.4:8001]", last)
	}

	// Scale in.
	srv.MustSet(t, strings.Replace(bbsZone, "frontend.bbs.svc.cluster.local.\t5\tIN\tA\t10.1.0.2\n", "", 1))
	if s = refreshNow(t, w); dials(s.Endpoints) != "10.1.0.3:8001" {
		t.Fatalf("after scale-in: [%s]", dials(s.Endpoints))
	}
	changed = logs.FilterMessage("endpoints changed").All()
	if got := changed[len(changed)-1].ContextMap()["removed"].([]any); len(got) != 2 {
		t.Fatalf("change log removed %v; want 10.1.0.2:8001 and 10.1.0.4:8001", got)
	}

	// No ready endpoints: NXDOMAIN empties the set, with an error naming service and server.
	srv.MustSet(t, "")
	s = refreshNow(t, w)
	if len(s.Endpoints) != 0 || s.Outcome != OutcomeNXDomain || s.Unavailable == nil {
		t.Fatalf("after NXDOMAIN: %+v", s)
	}
	for _, want := range []string{"frontend.bbs.svc.cluster.local:8001", srv.Addr, "no ready endpoints"} {
		if !strings.Contains(s.Unavailable.Error(), want) {
			t.Errorf("Unavailable %q lacks %q", s.Unavailable, want)
		}
	}

	// Back.
	srv.MustSet(t, bbsZone)
	if s = refreshNow(t, w); len(s.Endpoints) != 2 || s.Unavailable != nil {
		t.Fatalf("after recovery: %+v", s)
	}
}

func TestWatcherKeepsLastGoodSetOnErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		fail    func(*dnstest.Server)
		outcome Outcome
	}{
		{"SERVFAIL", func(s *dnstest.Server) { s.Fail(dns.RcodeServerFailure) }, OutcomeServFail},
		{"REFUSED", func(s *dnstest.Server) { s.Fail(dns.RcodeRefused) }, OutcomeRefused},
		{"timeout", func(s *dnstest.Server) { s.Mute(true) }, OutcomeTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := dnstest.Start(t, bbsZone)
			w, logs := startWatcher(t, srv, "frontend.bbs:http", nil)
			good := refreshNow(t, w)

			tc.fail(srv)
			s := refreshNow(t, w)
			if dials(s.Endpoints) != dials(good.Endpoints) || !s.Stale() || s.Err == nil || s.Outcome != tc.outcome {
				t.Fatalf("after %s: endpoints [%s] stale %v err %v outcome %s; want the last good set kept and marked stale",
					tc.name, dials(s.Endpoints), s.Stale(), s.Err, s.Outcome)
			}
			if !s.Resolved.Equal(good.Resolved) {
				t.Errorf("Resolved moved from %s to %s on a failure", good.Resolved, s.Resolved)
			}
			warn := logs.FilterLevelExact(zapcore.WarnLevel).All()
			if len(warn) == 0 || !strings.Contains(warn[len(warn)-1].Message, "keeping 2 endpoints from") {
				t.Fatalf("want a warning saying what is kept, got %v", warn)
			}
			// The next attempt comes after a short backoff, not the 1h refresh.
			if wait := s.Next.Sub(s.ErrAt); wait < 250*time.Millisecond || wait > 275*time.Millisecond {
				t.Errorf("first retry in %s, want 250-275ms", wait)
			}

			srv.Fail(-1)
			srv.Mute(false)
			s = refreshNow(t, w)
			if s.Stale() || s.Err != nil || len(s.Endpoints) != 2 {
				t.Fatalf("after recovery: stale %v err %v endpoints %d", s.Stale(), s.Err, len(s.Endpoints))
			}
			if logs.FilterMessage("DNS refresh recovered").Len() != 1 {
				t.Errorf("want one 'recovered' log")
			}
		})
	}
}

func TestWatcherStaleBound(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	w, _ := startWatcher(t, srv, "frontend:8001", func(c *Config) {
		c.Stale = 300 * time.Millisecond
		c.Resolver.Timeout = 50 * time.Millisecond
	})
	refreshNow(t, w)
	srv.Mute(true)
	// Failures retry on their own (250ms, 500ms, …) and the stale deadline is
	// scheduled exactly; no RefreshNow needed.
	w.Refresh()
	poll.Until(t, "the stale bound to drop the endpoints", func() bool { return w.Snapshot().Expired })
	s := w.Snapshot()
	// The watcher's own clock readings: the failure that dropped the set came
	// at least the bound after the first one.
	if failing := s.ErrAt.Sub(s.StaleSince); failing < 300*time.Millisecond {
		t.Fatalf("dropped after failing for %s, before the 300ms stale bound", failing)
	}
	if len(s.Endpoints) != 0 || s.Unavailable == nil || !strings.Contains(s.Unavailable.Error(), "longer than stale") {
		t.Fatalf("expired snapshot %+v", s)
	}
	srv.Mute(false)
	if s = refreshNow(t, w); len(s.Endpoints) != 2 || s.Expired {
		t.Fatalf("after recovery %+v", s)
	}
}

func TestWatcherIntervalFollowsTTL(t *testing.T) {
	for _, tc := range []struct {
		ttl      string
		min, max time.Duration
		want     time.Duration
	}{
		{"5", time.Second, time.Second, time.Second},                   // cluster default: check every second
		{"5", time.Second, time.Minute, 5 * time.Second},               // long max: the TTL decides
		{"0", time.Second, time.Minute, time.Second},                   // TTL 0: the minimum
		{"2147483647", time.Second, time.Minute, time.Minute},          // TTL 2^31-1: the maximum
		{"3600", 10 * time.Second, 30 * time.Second, 30 * time.Second}, // external DNS
	} {
		srv := dnstest.Start(t, "frontend.bbs.svc.cluster.local. "+tc.ttl+" IN A 10.1.0.2")
		w, _ := startWatcher(t, srv, "frontend:80", func(c *Config) { c.RefreshMin, c.RefreshMax, c.IPv6 = tc.min, tc.max, false })
		s := w.Wait(context.Background(), 5*time.Second)
		if s == nil {
			t.Fatal("no snapshot")
		}
		if got := s.Next.Sub(s.Resolved); got < tc.want || got > tc.want*11/10 {
			t.Errorf("ttl %s, refresh [%s,%s]: next in %s, want %s plus at most 10%% jitter", tc.ttl, tc.min, tc.max, got, tc.want)
		}
	}
}

func TestWatcherRefreshesOnItsOwn(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	w, _ := startWatcher(t, srv, "frontend:8001", func(c *Config) { c.RefreshMin, c.RefreshMax = 20*time.Millisecond, 20*time.Millisecond })
	w.Wait(context.Background(), 5*time.Second)
	srv.MustSet(t, "frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.9")
	poll.Until(t, "the background refresh to pick up the change", func() bool {
		return dials(w.Snapshot().Endpoints) == "10.1.0.9:8001"
	})
}

func TestWatcherFirstResolutionWaitIsBounded(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	srv.Mute(true)
	w, _ := startWatcher(t, srv, "frontend:8001", func(c *Config) { c.Resolver.Timeout = time.Hour })
	// The lookup takes an hour: Wait returns only through its own bound.
	got := make(chan *Snapshot, 1)
	go func() { got <- w.Wait(context.Background(), 100*time.Millisecond) }()
	select {
	case s := <-got:
		if s != nil {
			t.Fatalf("got snapshot %+v from a mute server", s)
		}
	case <-time.After(time.Minute): // not a speed claim: without the bound it waits an hour
		t.Fatal("Wait ignored its 100ms bound")
	}
}

func TestWatcherFirstFailureNamesService(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	srv.Fail(dns.RcodeServerFailure)
	w, logs := startWatcher(t, srv, "frontend:8001", nil)
	s := w.Wait(context.Background(), 5*time.Second)
	if s == nil || len(s.Endpoints) != 0 || !errors.Is(s.Unavailable, ErrNotResolved) ||
		!strings.Contains(s.Unavailable.Error(), srv.Addr) || !strings.Contains(s.Unavailable.Error(), "frontend.bbs") {
		t.Fatalf("snapshot after a failed first lookup: %+v", s)
	}
	if logs.FilterMessageSnippet("requests to frontend.bbs.svc.cluster.local:8001 will fail").Len() == 0 {
		t.Fatalf("want a warning that requests will fail, got %v", logs.All())
	}
}

// onFakeClock runs a watcher of frontend.bbs on a clock the test moves,
// refreshing every hour unless kicked.
func onFakeClock(t *testing.T) (*Watcher, *clocktest.Fake) {
	t.Helper()
	srv := dnstest.Start(t, bbsZone)
	svc, err := ParseService("frontend:8001", Defaults{Namespace: "bbs"})
	if err != nil {
		t.Fatal(err)
	}
	clk := clocktest.NewFake()
	w := New(Config{Service: svc, IPv4: true, Resolver: &Resolver{Servers: []string{srv.Addr}},
		RefreshMin: time.Hour, RefreshMax: time.Hour}, nil)
	w.clock = clk
	w.Run()
	t.Cleanup(w.Stop)
	return w, clk
}

// Refresh is what every retried request calls (ResetCache): however often it
// comes, lookups it asks for start at least minKickGap apart. The loop runs
// on a clock the test drives, so nothing here depends on how fast the
// machine is: while the clock stands still, no number of kicks makes a
// lookup; once it has moved minKickGap, the kicks so far make exactly one.
func TestWatcherKickIsRateLimited(t *testing.T) {
	w, clk := onFakeClock(t)
	poll.Until(t, "the first lookup", func() bool { s := w.Snapshot(); return s != nil && s.Seq == 1 })

	for round := uint64(1); round <= 3; round++ {
		// The loop has taken a kick when it set its timer to the end of the
		// gap (or, were the limit gone, when it started a lookup).
		gapEnd := clk.Now().Add(minKickGap)
		for range 100 {
			w.Refresh()
		}
		poll.Until(t, "the loop to take a kick", func() bool { return clk.ArmedAt(gapEnd) || w.started.Load() > round })
		for range 100 {
			w.Refresh()
		}
		if n := w.started.Load(); n != round {
			t.Fatalf("round %d: 200 kicks within minKickGap of the last lookup started %d lookups; want none", round, n-round)
		}
		clk.Advance(minKickGap - time.Nanosecond)
		if n := w.started.Load(); n != round {
			t.Fatalf("round %d: a lookup started 1ns before the gap ended", round)
		}
		clk.Advance(time.Nanosecond)
		poll.Until(t, "the requested lookup once the gap ended", func() bool { s := w.Snapshot(); return s.Seq == round+1 })
		if n := w.started.Load(); n != round+1 {
			t.Fatalf("round %d: %d lookups after the gap; want exactly one for all the kicks", round, n-round)
		}
	}
}

// A kick within the gap is served by the timer the loop arms for the gap's
// end, with no further kick. TestWatcherKickIsRateLimited cannot show this:
// of its bursts, a kick already handed to the loop may be looked at only
// after the test moved the clock, and start the lookup itself. Here exactly
// one kick is sent, when the loop waits for its next refresh, and the test
// moves the clock only once the loop has armed the gap's timer.
func TestWatcherKickInTheGapIsServedAtItsEnd(t *testing.T) {
	w, clk := onFakeClock(t)
	for round := uint64(1); round <= 3; round++ {
		var s *Snapshot
		poll.Until(t, "the loop to wait for the next refresh", func() bool {
			s = w.Snapshot()
			return s != nil && s.Seq == round && clk.ArmedAt(s.Next)
		})
		gapEnd := clk.Now().Add(minKickGap) // the clock has not moved since the lookup started
		w.Refresh()
		poll.Until(t, "the loop to arm its timer for the end of the gap", func() bool { return clk.ArmedAt(gapEnd) })
		clk.Advance(minKickGap - time.Nanosecond)
		if n := w.started.Load(); n != round {
			t.Fatalf("round %d: a lookup started 1ns before the gap ended", round)
		}
		clk.Advance(time.Nanosecond)
		poll.Until(t, "the timer to start the requested lookup at the end of the gap", func() bool { return w.Snapshot().Seq == round+1 })
	}
}

// With every lookup hanging (a muted server, an attempt timeout of an hour),
// Stop cancels the lookups in flight and leaves no goroutine behind.
func TestWatcherStopLeavesNoGoroutine(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	base := runtime.NumGoroutine()
	var ws []*Watcher
	for range 20 {
		svc, _ := ParseService("frontend:8001", Defaults{Namespace: "bbs"})
		ws = append(ws, Start(Config{Service: svc, IPv4: true, Resolver: &Resolver{Servers: []string{srv.Addr}, Timeout: time.Hour},
			RefreshMin: 10 * time.Millisecond, RefreshMax: 10 * time.Millisecond}, nil))
	}
	srv.Mute(true)
	inFlight := func(w *Watcher) bool {
		done := uint64(0)
		if s := w.Snapshot(); s != nil {
			done = s.Seq
		}
		return w.started.Load() > done
	}
	// Every one of them in a lookup that never returns: the server is
	// silent, so none can finish and the state cannot change under us.
	poll.Until(t, "a lookup in flight in every watcher", func() bool {
		for _, w := range ws {
			if !inFlight(w) {
				return false
			}
		}
		return true
	})
	for _, w := range ws {
		w.Stop()
	}
	poll.Goroutines(t, base)
}

// A v4-only Service is asked AAAA only every missingFamilyEvery-th lookup,
// and is seen with its AAAA records within that many once it gets them; an
// A set that empties is asked both at once, never emptied unasked.
func TestMissingFamilyAskedRarely(t *testing.T) {
	const lookups = 3 * missingFamilyEvery
	srv := dnstest.Start(t, "web.bbs.svc.cluster.local. 5 IN A 10.0.0.1")
	var aaaa atomic.Int64
	srv.Hook(func(_ dns.ResponseWriter, q *dns.Msg) bool {
		if q.Question[0].Qtype == dns.TypeAAAA {
			aaaa.Add(1)
		}
		return false
	})
	w, _ := startWatcher(t, srv, "web:80", func(c *Config) { c.RefreshMin, c.RefreshMax = time.Millisecond, time.Millisecond })
	waitSeq := func(seq uint64) *Snapshot {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			if s := w.Snapshot(); s != nil && s.Seq >= seq {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatalf("lookup %d not reached", seq)
			}
			time.Sleep(time.Millisecond)
		}
	}
	s := waitSeq(lookups)
	// Lookup 1 asks both, then one in missingFamilyEvery; a lookup may be
	// under way (+1).
	if got, max := aaaa.Load(), int64(s.Seq/missingFamilyEvery+2); got > max {
		t.Fatalf("%d lookups asked AAAA %d times, want at most %d", s.Seq, got, max)
	}
	srv.MustSet(t, "web.bbs.svc.cluster.local. 5 IN A 10.0.0.1\nweb.bbs.svc.cluster.local. 5 IN AAAA fd00::1")
	from := w.Snapshot().Seq
	for s := waitSeq(from); !strings.Contains(dials(s.Endpoints), "[fd00::1]:80"); s = waitSeq(s.Seq + 1) {
		if s.Seq > from+missingFamilyEvery+1 {
			t.Fatalf("dual-stack not seen %d lookups later: %s", s.Seq-from, dials(s.Endpoints))
		}
	}
	// Now v6 only: the A set empties, AAAA is asked at once.
	srv.MustSet(t, "web.bbs.svc.cluster.local. 5 IN AAAA fd00::1")
	waitSeq(w.Snapshot().Seq + 2)
	srv.MustSet(t, "web.bbs.svc.cluster.local. 5 IN A 10.0.0.2")
	from = w.Snapshot().Seq
	for range 2 * missingFamilyEvery {
		s := waitSeq(from + 1)
		if len(s.Endpoints) == 0 {
			t.Fatalf("lookup %d: no endpoints though 10.0.0.2 is in DNS", s.Seq)
		}
		from = s.Seq
	}
}

// While the answer is one family only, only that family is asked; when it
// comes back empty, both are asked at once: a set is never emptied for a
// family that was not asked. (Lookup by lookup, without the polling of
// TestMissingFamilyAskedRarely, which can step over one empty snapshot.)
func TestSingleFamilyEmptiedAsksBoth(t *testing.T) {
	srv := dnstest.Start(t, "web.bbs.svc.cluster.local. 5 IN AAAA fd00::1")
	w, _ := startWatcher(t, srv, "web:80", nil)
	if s := refreshNow(t, w); dials(s.Endpoints) != "[fd00::1]:80" {
		t.Fatalf("v6 only: [%s]", dials(s.Endpoints))
	}
	srv.MustSet(t, "web.bbs.svc.cluster.local. 5 IN A 10.0.0.2")
	s := refreshNow(t, w)
	if s.Seq%missingFamilyEvery == 0 {
		t.Fatalf("lookup %d asks both families anyway: pick another", s.Seq)
	}
	if dials(s.Endpoints) != "10.0.0.2:80" || s.Outcome != OutcomeSuccess {
		t.Fatalf("lookup %d after the AAAA set emptied: [%s] %s; want [10.0.0.2:80] success", s.Seq, dials(s.Endpoints), s.Outcome)
	}
}
