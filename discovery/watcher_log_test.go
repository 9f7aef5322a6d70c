package discovery

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// The logs an operator relies on (issue 5): one info line per change of the
// endpoint set with what was added and removed; a warning with the
// consequence when a refresh fails or DNS leaves no endpoints; a debug line
// for every lookup.
func TestWatcherLogs(t *testing.T) {
	const two = `
		web.shop.svc.cluster.local. 5 IN A 10.2.0.1
		web.shop.svc.cluster.local. 5 IN A 10.2.0.2
	`
	srv := dnstest.Start(t, two)
	svc, err := ParseService("web.shop:8080", Defaults{})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	w := Start(Config{
		Service: svc, IPv4: true, IPv6: true,
		Resolver:   &Resolver{Servers: []string{srv.Addr}, Timeout: 200 * time.Millisecond},
		RefreshMin: time.Hour, RefreshMax: time.Hour,
	}, zap.New(core))
	t.Cleanup(w.Stop)
	refresh := func() *Snapshot {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := w.RefreshNow(ctx)
		if err != nil {
			t.Fatalf("RefreshNow: %v", err)
		}
		return s
	}
	// lastLog returns the newest entry with message msg, failing if there is none.
	lastLog := func(msg string) observer.LoggedEntry {
		t.Helper()
		all := logs.FilterMessage(msg).All()
		if len(all) == 0 {
			t.Fatalf("no %q log; have %v", msg, observedMessages(logs))
		}
		return all[len(all)-1]
	}
	const name = "web.shop.svc.cluster.local:8080"

	refresh()
	e := lastLog("endpoints changed")
	if e.Level != zapcore.InfoLevel || fmt.Sprint(e.ContextMap()["added"]) != "[10.2.0.1:8080 10.2.0.2:8080]" ||
		e.ContextMap()["service"] != name {
		t.Fatalf("first resolution: %v %v", e.Level, e.ContextMap())
	}

	// A replaced pod: one line with both what came and what went.
	srv.MustSet(t, strings.Replace(two, "10.2.0.1", "10.2.0.3", 1))
	refresh()
	e = lastLog("endpoints changed")
	if fmt.Sprint(e.ContextMap()["added"]) != "[10.2.0.3:8080]" || fmt.Sprint(e.ContextMap()["removed"]) != "[10.2.0.1:8080]" {
		t.Fatalf("replacement: %v", e.ContextMap())
	}

	// DNS fails: the warning says what is kept and since when.
	srv.Fail(dns.RcodeServerFailure)
	refresh()
	warns := logs.FilterMessageSnippet("DNS refresh failed; keeping 2 endpoints from ").All()
	if len(warns) == 0 {
		t.Fatalf("no warning saying what is kept; have %v", observedMessages(logs))
	}
	e = warns[len(warns)-1]
	if e.Level != zapcore.WarnLevel || !strings.HasSuffix(e.Message, "s ago") ||
		!strings.Contains(fmt.Sprint(e.ContextMap()["error"]), "SERVFAIL") {
		t.Fatalf("failure while endpoints are known: %v %v", e.Level, e.ContextMap())
	}

	// NXDOMAIN: no ready endpoints. Not a DNS failure, but requests will fail: a warning.
	srv.Fail(-1)
	srv.MustSet(t, "")
	refresh()
	e = lastLog("endpoints changed")
	if e.Level != zapcore.WarnLevel || e.ContextMap()["consequence"] != "no endpoints: requests to "+name+" will fail" ||
		fmt.Sprint(e.ContextMap()["removed"]) != "[10.2.0.2:8080 10.2.0.3:8080]" {
		t.Fatalf("NXDOMAIN: %v %v", e.Level, e.ContextMap())
	}

	// DNS fails while there are no endpoints.
	srv.Fail(dns.RcodeRefused)
	s := refresh()
	e = lastLog("DNS refresh failed; no endpoints: requests to " + name + " will fail")
	if e.Level != zapcore.WarnLevel {
		t.Fatalf("failure without endpoints logged at %v", e.Level)
	}

	// Every lookup, failed or not, has its debug line.
	lookups := logs.FilterMessage("lookup").All()
	if uint64(len(lookups)) < s.Seq {
		t.Fatalf("%d debug lookup lines for %d lookups", len(lookups), s.Seq)
	}
	seen := map[string]bool{}
	for _, l := range lookups {
		if l.Level != zapcore.DebugLevel || l.ContextMap()["service"] != name {
			t.Fatalf("lookup line %v %v", l.Level, l.ContextMap())
		}
		outcome := fmt.Sprint(l.ContextMap()["outcome"])
		seen[outcome] = true
		if _, hasErr := l.ContextMap()["error"]; hasErr != Outcome(outcome).Transient() {
			t.Errorf("lookup line with outcome %s: error field present = %v", outcome, hasErr)
		}
	}
	for _, o := range []Outcome{OutcomeSuccess, OutcomeServFail, OutcomeNXDomain, OutcomeRefused} {
		if !seen[string(o)] {
			t.Errorf("no debug lookup line with outcome %s; saw %v", o, seen)
		}
	}
}

func observedMessages(logs *observer.ObservedLogs) []string {
	var out []string
	for _, e := range logs.All() {
		out = append(out, e.Level.String()+" "+e.Message)
	}
	return out
}

// A shared watcher logs through the newest configuration attached to it; when
// that one is dropped (say it failed to load after provisioning), through the
// one before again, not through the dropped one's closed logs.
func TestWatcherAttachedLoggers(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	w, base := startWatcher(t, srv, "frontend:8001", nil)
	refreshNow(t, w)
	coreA, logsA := observer.New(zapcore.DebugLevel)
	coreB, logsB := observer.New(zapcore.DebugLevel)
	detachA := w.AttachLogger(zap.New(coreA))
	detachB := w.AttachLogger(zap.New(coreB))
	lookups := func(l *observer.ObservedLogs) int { return l.FilterMessage("lookup").Len() }
	refreshNow(t, w)
	if lookups(logsB) != 1 || lookups(logsA) != 0 {
		t.Fatalf("newest attached: A %d, B %d lookup lines; want B's 1", lookups(logsA), lookups(logsB))
	}
	detachB()
	detachB() // twice is once
	refreshNow(t, w)
	if lookups(logsA) != 1 || lookups(logsB) != 1 {
		t.Fatalf("after B left: A %d, B %d lookup lines; want A's 1", lookups(logsA), lookups(logsB))
	}
	n := lookups(base)
	detachA()
	refreshNow(t, w)
	if lookups(base) != n+1 || lookups(logsA) != 1 {
		t.Fatalf("none attached: want Start's logger back")
	}
}
