package discovery

import (
	"context"
	"errors"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

const asideZone = `
frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.2
frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.3
frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.4
`

// fakeDials replaces the set-aside probe: each probe of an address waits for
// an answer sent on that address's channel (nil: it connects, an error: it
// fails), so a test decides when a probe ends instead of sleeping.
type fakeDials struct {
	answers map[string]chan error
	started chan string
}

func newFakeDials(w *Watcher, addrs ...string) *fakeDials {
	f := &fakeDials{answers: map[string]chan error{}, started: make(chan string, 16)}
	for _, a := range addrs {
		f.answers[a] = make(chan error)
	}
	w.aside.dial = func(ctx context.Context, addr string) error {
		f.started <- addr
		select {
		case err := <-f.answers[addr]:
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return f
}

func mustEndpoints(t *testing.T, w *Watcher) []string {
	t.Helper()
	eps, err := w.Endpoints(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(dials(eps))
}

func TestSetAsideUntilAConnectionSucceeds(t *testing.T) {
	srv := dnstest.Start(t, asideZone)
	w, logs := startWatcher(t, srv, "frontend.bbs:80", nil)
	refreshNow(t, w)
	f := newFakeDials(w, "10.1.0.3:80")

	w.SetAside("10.1.0.3:80")
	if got, want := mustEndpoints(t, w), []string{"10.1.0.2:80", "10.1.0.4:80"}; !slices.Equal(got, want) {
		t.Fatalf("after SetAside: endpoints %v, want %v", got, want)
	}
	if got := w.Status().SetAside; !slices.Equal(got, []string{"10.1.0.3:80"}) {
		t.Fatalf("Status().SetAside = %v", got)
	}
	// The first probe starts at once; it fails (refused), so does the next.
	for range 2 {
		<-f.started
		f.answers["10.1.0.3:80"] <- errors.New("connection refused")
	}
	if got := mustEndpoints(t, w); len(got) != 2 {
		t.Fatalf("after failed probes: endpoints %v, want 2", got)
	}
	// Setting it aside again changes nothing and starts no second probe.
	w.SetAside("10.1.0.3:80")
	<-f.started
	f.answers["10.1.0.3:80"] <- nil // it accepts again
	poll.Until(t, "the endpoint taken back", func() bool { return len(mustEndpoints(t, w)) == 3 })
	if n := logs.FilterMessageSnippet("endpoint set aside").Len(); n != 1 {
		t.Errorf("%d 'set aside' log lines, want 1", n)
	}
	if n := logs.FilterMessageSnippet("endpoint taken back").Len(); n != 1 {
		t.Errorf("%d 'taken back' log lines, want 1", n)
	}
}

func TestSetAsideEndsWhenTheEndpointLeavesDNS(t *testing.T) {
	srv := dnstest.Start(t, asideZone)
	w, _ := startWatcher(t, srv, "frontend.bbs:80", nil)
	refreshNow(t, w)
	f := newFakeDials(w, "10.1.0.3:80")
	w.SetAside("10.1.0.3:80")
	<-f.started // a probe is in flight, and never answered

	srv.MustSet(t, `
frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.2
frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.4
`)
	refreshNow(t, w)
	if got := w.Status().SetAside; len(got) != 0 {
		t.Fatalf("an endpoint that left DNS is still set aside: %v", got)
	}
	// Its probe ended: the context the fake waits on was cancelled, so the
	// wait group is done (Stop would hang otherwise, and the test time out).
	w.aside.wg.Wait()

	// An address the Service does not have is ignored.
	w.SetAside("10.9.9.9:80")
	if got := w.Status().SetAside; len(got) != 0 {
		t.Fatalf("an address the Service does not have was set aside: %v", got)
	}
}

func TestSetAsideEveryEndpointFailsOpen(t *testing.T) {
	srv := dnstest.Start(t, asideZone)
	w, _ := startWatcher(t, srv, "frontend.bbs:80", nil)
	refreshNow(t, w)
	newFakeDials(w, "10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80")
	for _, d := range []string{"10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80"} {
		w.SetAside(d)
	}
	if got := mustEndpoints(t, w); len(got) != 3 {
		t.Fatalf("every endpoint set aside: requests get %v, want all three (a try may still get through)", got)
	}
}

func TestSetAsideFiltersCandidates(t *testing.T) {
	srv := dnstest.Start(t, asideZone)
	w, _ := startWatcher(t, srv, "frontend.bbs:80", nil)
	refreshNow(t, w)
	newFakeDials(w, "10.1.0.3:80")
	w.SetAside("10.1.0.3:80")
	s := &Sampler{Pick: PickRandom, Size: 2}
	for range 200 {
		eps, err := w.Candidates(context.Background(), s)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(dials(eps), "10.1.0.3:80") {
			t.Fatalf("a candidate list holds the endpoint set aside: %v", dials(eps))
		}
	}
}

// The real probe connects to a listener and is refused by a closed port.
func TestSetAsideProbeDialsTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := dialTCP(context.Background(), addr); err != nil {
		t.Fatalf("dialTCP to a listener: %v", err)
	}
	ln.Close()
	if err := dialTCP(context.Background(), addr); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("dialTCP to a closed port: %v, want connection refused", err)
	}
}

func TestCacheDetectedFromACountdown(t *testing.T) {
	for _, tc := range []struct {
		name   string
		ttls   []uint32
		cached bool
	}{
		{"fixed TTL (CoreDNS answering itself)", []uint32{30, 30, 30, 30}, false},
		{"countdown (a cache)", []uint32{30, 29, 28}, true},
		{"refilled cache", []uint32{2, 1, 30, 29}, true},
		{"rising only", []uint32{5, 10, 20}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := dnstest.Start(t, asideZone)
			w, logs := startWatcher(t, srv, "frontend.bbs:80", func(c *Config) { c.IPv6 = false })
			var s *Snapshot
			for _, ttl := range tc.ttls {
				srv.MustSet(t, strings.ReplaceAll(asideZone, " 5 IN", " "+strconv.Itoa(int(ttl))+" IN"))
				s = refreshNow(t, w)
			}
			if s.Cached != tc.cached {
				t.Fatalf("Cached = %v after TTLs %v, want %v", s.Cached, tc.ttls, tc.cached)
			}
			warns := logs.FilterLevelExact(zapcore.WarnLevel).FilterMessageSnippet("from a cache")
			if want := map[bool]int{true: 1, false: 0}[tc.cached]; warns.Len() != want {
				t.Fatalf("%d cache warnings, want %d", warns.Len(), want)
			}
			if tc.cached && s.MaxTTL.Seconds() != 30 {
				t.Errorf("MaxTTL = %s, want 30s", s.MaxTTL)
			}
		})
	}
}

// The TTL of an answer with records is theirs: a NODATA for the other
// family (asked every 30th lookup) must not lower it, or it would look like
// a countdown.
func TestResultTTLIsTheRecords(t *testing.T) {
	for _, order := range [][]Outcome{{OutcomeSuccess, OutcomeNoData}, {OutcomeNoData, OutcomeSuccess}} {
		res := Result{Outcome: OutcomeNXDomain}
		for _, o := range order {
			ttl := map[Outcome]time.Duration{OutcomeSuccess: 30 * time.Second, OutcomeNoData: 5 * time.Second}[o]
			res.merge(o, ttl)
		}
		if res.Outcome != OutcomeSuccess || res.TTL != 30*time.Second {
			t.Errorf("merge %v: outcome %s TTL %s, want success 30s", order, res.Outcome, res.TTL)
		}
	}
}

// A changed answer with a lower TTL is no countdown.
func TestCacheNotDetectedFromChanges(t *testing.T) {
	srv := dnstest.Start(t, asideZone)
	w, _ := startWatcher(t, srv, "frontend.bbs:80", nil) // A and AAAA: AAAA is NODATA, SOA minimum 5
	srv.MustSet(t, strings.ReplaceAll(asideZone, " 5 IN", " 30 IN"))
	refreshNow(t, w)
	refreshNow(t, w)
	srv.MustSet(t, "frontend.bbs.svc.cluster.local. 20 IN A 10.1.0.2\n")
	if s := refreshNow(t, w); s.Cached || s.TTL.Seconds() != 20 {
		t.Fatalf("after a change with a lower TTL: Cached %v TTL %s, want false, 20s", s.Cached, s.TTL)
	}
}
