package discovery

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/clock"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

// panickyClock is the real clock, except that Now panics once when armed:
// a bug inside the refresh loop, on purpose.
type panickyClock struct {
	clock.Real
	armed atomic.Bool
}

func (c *panickyClock) Now() time.Time {
	if c.armed.CompareAndSwap(true, false) {
		panic("test: a bug in the refresh loop")
	}
	return time.Now()
}

// wantPanicLogged finds the error entry msg, with the panic and its stack,
// which names the function that recovered.
func wantPanicLogged(t *testing.T, logs *observer.ObservedLogs, msg, recoveredIn string) {
	t.Helper()
	poll.Until(t, "the panic logged at error: "+msg, func() bool { return logs.FilterMessage(msg).Len() > 0 })
	e := logs.FilterMessage(msg).All()[0]
	fields := e.ContextMap()
	stack, _ := fields["stack"].(string)
	if e.Level != zapcore.ErrorLevel || !strings.Contains(stack, recoveredIn) || fields["panic"] == nil {
		t.Fatalf("panic logged as %s with fields %v; want error level, the panic and a stack through %s", e.Level, fields, recoveredIn)
	}
}

// A panic inside the refresh loop does not end the process: it is logged at
// error with its stack, the last endpoints stay served, and the loop starts
// again and follows DNS.
func TestWatcherLoopSurvivesPanic(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	svc, err := ParseService("frontend:8001", Defaults{Namespace: "bbs"})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	clk := &panickyClock{}
	w := New(Config{Service: svc, IPv4: true, Resolver: &Resolver{Servers: []string{srv.Addr}},
		RefreshMin: time.Hour, RefreshMax: time.Hour}, zap.New(core))
	w.clock = clk
	w.Run()
	t.Cleanup(w.Stop)
	first := w.Wait(context.Background(), 30*time.Second)
	if first == nil || dials(first.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001" {
		t.Fatalf("first snapshot %+v", first)
	}

	clk.armed.Store(true)
	w.Refresh() // the loop takes the kick and reads the clock: panic
	wantPanicLogged(t, logs, "DNS refresh loop panicked; serving the last endpoints and restarting it", "(*Watcher).loop")
	if s := w.Snapshot(); s != first {
		t.Fatalf("snapshot after the panic %+v; want the last one kept", s)
	}
	eps, err := w.Endpoints(context.Background())
	if err != nil || dials(eps) != "10.1.0.2:8001 10.1.0.3:8001" {
		t.Fatalf("endpoints after the panic: %v, %v; want the last set", dials(eps), err)
	}

	// The loop runs again: a change in DNS is followed.
	srv.MustSet(t, "frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.9")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := w.RefreshNow(ctx)
	if err != nil || dials(s.Endpoints) != "10.1.0.9:8001" || s.Seq <= first.Seq {
		t.Fatalf("after the restart: %+v, %v; want the new endpoint from a later lookup", s, err)
	}
}

// A panic inside a probe does not end the process nor the worker: it is
// logged at error with its stack, the endpoint is probed again, and the
// worker (the only one) goes on with the rest of the queue.
func TestProbeWorkerSurvivesPanic(t *testing.T) {
	p := startProber(t, HealthCheck{MaxInFlight: 1, Interval: 5 * time.Millisecond})
	core, logs := observer.New(zapcore.DebugLevel)
	p.logger.Store(zap.New(core))
	a, b := endpointOf(t, "127.0.0.1:81"), endpointOf(t, "127.0.0.2:81")
	var panicked atomic.Bool
	p.run = func(_ context.Context, e Endpoint) error {
		if e.Dial == a.Dial && panicked.CompareAndSwap(false, true) {
			panic("test: a bug in a probe")
		}
		return nil
	}
	p.discover(a, b)
	wantPanicLogged(t, logs, "health probe panicked; the endpoint keeps its state and is probed again after an interval", "(*prober).probeSafely")
	p.until(t, a.Dial, func(ev CheckEvent) bool { return ev.Passed && ev.State == Healthy })
	p.until(t, b.Dial, func(ev CheckEvent) bool { return ev.Passed && ev.State == Healthy })
	if v := p.View(); eligible(v) != a.Dial+" "+b.Dial {
		t.Fatalf("eligible %q after the panic; want both", eligible(v))
	}
	p.mu.Lock()
	workers := p.workers
	p.mu.Unlock()
	if workers > 1 {
		t.Fatalf("%d workers; want at most MaxInFlight 1", workers)
	}
}
