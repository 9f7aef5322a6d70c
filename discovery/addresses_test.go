package discovery

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

func TestAddressPolicy(t *testing.T) {
	cidrs := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}
	everywhere := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
	for _, tc := range []struct {
		policy AddressPolicy
		ip     string
		want   string
	}{
		{AddressPolicy{}, "10.1.0.2", ""},
		{AddressPolicy{}, "192.0.2.1", ""},
		{AddressPolicy{}, "fd00::1", ""},
		{AddressPolicy{}, "127.0.0.1", RefusedLoopback},
		{AddressPolicy{}, "127.1.2.3", RefusedLoopback},
		{AddressPolicy{}, "::1", RefusedLoopback},
		{AddressPolicy{}, "169.254.169.254", RefusedLinkLocal}, // cloud metadata
		{AddressPolicy{}, "fe80::1", RefusedLinkLocal},
		{AddressPolicy{Loopback: true}, "127.0.0.1", ""},
		{AddressPolicy{Loopback: true}, "169.254.169.254", RefusedLinkLocal},
		{AddressPolicy{LinkLocal: true}, "169.254.169.254", ""},
		{AddressPolicy{LinkLocal: true}, "::1", RefusedLoopback},
		{AddressPolicy{CIDRs: cidrs}, "10.1.0.2", ""},
		{AddressPolicy{CIDRs: cidrs}, "fd12::3", ""},
		{AddressPolicy{CIDRs: cidrs}, "192.0.2.1", RefusedOutside},
		{AddressPolicy{CIDRs: cidrs}, "127.0.0.1", RefusedOutside},
		{AddressPolicy{CIDRs: cidrs, Loopback: true}, "127.0.0.1", ""},
		{AddressPolicy{CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}, "127.0.0.5", ""}, // named explicitly
		// D4: a range that merely contains loopback or link-local does not allow them.
		{AddressPolicy{CIDRs: everywhere}, "10.1.0.2", ""},
		{AddressPolicy{CIDRs: everywhere}, "fd00::1", ""},
		{AddressPolicy{CIDRs: everywhere}, "127.0.0.1", RefusedLoopback},
		{AddressPolicy{CIDRs: everywhere}, "::1", RefusedLoopback},
		{AddressPolicy{CIDRs: everywhere}, "169.254.169.254", RefusedLinkLocal},
		{AddressPolicy{CIDRs: everywhere}, "fe80::1", RefusedLinkLocal},
		{AddressPolicy{CIDRs: []netip.Prefix{netip.MustParsePrefix("120.0.0.0/5")}}, "127.0.0.1", RefusedLoopback},
		{AddressPolicy{CIDRs: everywhere, Loopback: true}, "127.0.0.1", ""},
		{AddressPolicy{CIDRs: everywhere, LinkLocal: true}, "fe80::1", ""},
		{AddressPolicy{CIDRs: []netip.Prefix{netip.MustParsePrefix("169.254.169.254/32")}}, "169.254.169.254", ""},
		{AddressPolicy{CIDRs: []netip.Prefix{netip.MustParsePrefix("fe80::/10")}}, "fe80::1", ""},
		{AddressPolicy{CIDRs: []netip.Prefix{netip.MustParsePrefix("::1/128")}}, "::1", ""},
	} {
		if got := tc.policy.refuses(netip.MustParseAddr(tc.ip)); got != tc.want {
			t.Errorf("%+v refuses %s: %q, want %q", tc.policy, tc.ip, got, tc.want)
		}
	}
}

// The attack of issue 13: a name whose SRV record points at port 2019 (Caddy's
// admin API) on 127.0.0.1, or A records of loopback and cloud metadata
// addresses beside a real one. The real endpoints are used; the others are
// dropped, counted and named in one warning per change.
func TestWatcherRefusesLoopbackAndLinkLocal(t *testing.T) {
	srv := dnstest.Start(t, `
		_http._tcp.evil.example. 5 IN SRV 0 100 2019 admin.evil.example.
		_http._tcp.evil.example. 5 IN SRV 0 100 8080 web.evil.example.
		admin.evil.example. 5 IN A 127.0.0.1
		web.evil.example. 5 IN A 10.9.0.1
		mixed.example. 5 IN A 10.9.0.2
		mixed.example. 5 IN A 169.254.169.254
		mixed.example. 5 IN AAAA fe80::1
		mixed.example. 5 IN AAAA ::1
		mixed.example. 5 IN AAAA fd00::9
	`)
	for _, tc := range []struct {
		ref, want string
		refused   int
	}{
		{"evil.example.:http", "10.9.0.1:8080", 1},
		{"mixed.example.:80", "10.9.0.2:80 [fd00::9]:80", 3},
	} {
		w, logs := startWatcher(t, srv, tc.ref, func(c *Config) { c.Resolver.Timeout = 10 * time.Second })
		for range 3 {
			s := refreshNow(t, w)
			if dials(s.Endpoints) != tc.want || s.Err != nil {
				t.Fatalf("%s: [%s] %v; want [%s]", tc.ref, dials(s.Endpoints), s.Err, tc.want)
			}
		}
		// 3 lookups, or 4 if the one Start begins finished before the first RefreshNow.
		st := w.Status().Stats
		if n := st.LookupCount(); st.Refused != uint64(tc.refused)*n {
			t.Errorf("%s: Stats.Refused %d after %d lookups, want %d", tc.ref, st.Refused, n, uint64(tc.refused)*n)
		}
		warns := logs.FilterMessageSnippet("not allowed").All()
		if len(warns) != 1 {
			t.Fatalf("%s: %d warnings about refused addresses over 3 identical answers, want 1: %v", tc.ref, len(warns), observedMessages(logs))
		}
		if ctx := fmt.Sprint(warns[0].ContextMap()["refused"]); !strings.Contains(ctx, "127.0.0.1") && !strings.Contains(ctx, "169.254.169.254") {
			t.Errorf("%s: the warning does not name the refused records: %v", tc.ref, warns[0].ContextMap())
		}
	}
}

// Only refused addresses in the answer: not "no ready endpoints" (which would
// empty a good set) but a bad answer, with an error that says how to allow them.
func TestWatcherAllRefusedKeepsLastGoodSet(t *testing.T) {
	srv := dnstest.Start(t, "web.example. 5 IN A 10.9.0.1")
	w, _ := startWatcher(t, srv, "web.example.:80", func(c *Config) { c.IPv6, c.Resolver.Timeout = false, 10*time.Second })
	if s := refreshNow(t, w); dials(s.Endpoints) != "10.9.0.1:80" {
		t.Fatalf("first: [%s] %v", dials(s.Endpoints), s.Err)
	}
	srv.MustSet(t, "web.example. 5 IN A 127.0.0.1")
	s := refreshNow(t, w)
	if dials(s.Endpoints) != "10.9.0.1:80" || s.Outcome != OutcomeBadAnswer || !s.Stale() {
		t.Fatalf("after a loopback-only answer: [%s] %s stale=%t; want the good set kept, bad_answer", dials(s.Endpoints), s.Outcome, s.Stale())
	}
	if !strings.Contains(s.Err.Error(), "allow_addresses loopback") {
		t.Errorf("error %q does not say how to allow loopback", s.Err)
	}
}

// A DNS outage must not warn on every attempt: the error text changes with
// each ephemeral source port, the failure does not. Nor does a bound
// exceeded on every lookup. One warning, then one per warnRepeat.
func TestWatcherWarningsRateLimited(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	svc := Service{Ref: "web:80", FQDN: "web.default.svc.cluster.local.", Port: 80}
	w := &Watcher{cfg: Config{Service: svc, RefreshMin: time.Second, RefreshMax: time.Second}.WithDefaults()}
	w.logger.Store(zap.New(core))
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	good := Result{Endpoints: []Endpoint{{IP: netip.MustParseAddr("10.0.0.1"), Port: 80, Dial: "10.0.0.1:80"}},
		Outcome: OutcomeSuccess, TTL: time.Second, Server: "10.96.0.10:53", Dropped: 5}
	// taken counts the warnings with snippet logged since the last call.
	taken := func(snippet string) int {
		n := 0
		for _, e := range logs.TakeAll() {
			if strings.Contains(e.Message, snippet) {
				n++
			}
		}
		return n
	}
	var prev *Snapshot
	// 60 s of lookups, one per 100 ms, each exceeding a bound.
	for i := range 600 {
		prev = w.applyLookup(prev, good, nil, start.Add(time.Duration(i)*100*time.Millisecond), uint64(i+1), 0)
	}
	if n := taken("exceeded a bound"); n != 2 {
		t.Errorf("%d bound warnings over 60 s of identical answers, want 2 (at 0 s and 30 s)", n)
	}
	// Then 60 s of timeouts, one per 100 ms, each from another source port.
	start = start.Add(time.Minute)
	for i := range 600 {
		err := &LookupError{Name: svc.FQDN, Type: dns.TypeA, Server: "10.96.0.10:53", Outcome: OutcomeTimeout,
			Err: fmt.Errorf("read udp 127.0.0.1:%d->10.96.0.10:53: i/o timeout", 30000+i)}
		prev = w.applyLookup(prev, Result{}, err, start.Add(time.Duration(i)*100*time.Millisecond), uint64(1000+i), i+1)
	}
	if n := taken("DNS refresh failed"); n != 2 {
		t.Errorf("%d failure warnings over 60 s of one outage, want 2 (at 0 s and 30 s)", n)
	}
	// Another kind of failure is news, and warned about at once.
	err := &LookupError{Name: svc.FQDN, Type: dns.TypeA, Server: "10.96.0.10:53", Outcome: OutcomeServFail, Err: errors.New("SERVFAIL")}
	prev = w.applyLookup(prev, Result{}, err, start.Add(61*time.Second), 5000, 601)
	if n := taken("DNS refresh failed"); n != 1 {
		t.Errorf("%d warnings for a new kind of failure, want 1", n)
	}
	// The same failure from another server is news too: the failover moved on.
	err = &LookupError{Name: svc.FQDN, Type: dns.TypeA, Server: "10.96.0.11:53", Outcome: OutcomeServFail, Err: errors.New("SERVFAIL")}
	prev = w.applyLookup(prev, Result{}, err, start.Add(62*time.Second), 5001, 602)
	if n := taken("DNS refresh failed"); n != 1 {
		t.Errorf("%d warnings for the same failure from another server, want 1", n)
	}
	// An answer ends the outage: the same failure after it starts a new one,
	// warned about at once.
	prev = w.applyLookup(prev, good, nil, start.Add(63*time.Second), 5002, 0)
	w.applyLookup(prev, Result{}, err, start.Add(64*time.Second), 5003, 1)
	if n := taken("DNS refresh failed"); n != 1 {
		t.Errorf("%d warnings for a failure after a recovery, want 1", n)
	}
}

// D7, D12: addresses that can never be endpoints, whatever the policy.
func TestUnusableAddresses(t *testing.T) {
	for _, tc := range []struct {
		ip   string
		port uint16
		want string
	}{
		{"10.1.0.2", 80, ""},
		{"fd00::1", 80, ""},
		{"10.1.0.2", 0, RefusedPort0},
		{"0.0.0.0", 80, RefusedUnspecified},
		{"0.1.2.3", 80, RefusedUnspecified},
		{"::", 80, RefusedUnspecified},
		{"224.0.0.1", 80, RefusedMulticast},
		{"ff02::1", 80, RefusedMulticast},
		{"240.0.0.1", 80, RefusedReserved},
		{"255.255.255.255", 80, RefusedReserved},
		{"::ffff:127.0.0.9", 80, RefusedIPv4Mapped},
		{"::ffff:10.1.0.2", 80, RefusedIPv4Mapped},
		{"223.255.255.255", 80, ""},
	} {
		if got := unusable(Endpoint{IP: netip.MustParseAddr(tc.ip), Port: tc.port}); got != tc.want {
			t.Errorf("unusable(%s port %d) = %q, want %q", tc.ip, tc.port, got, tc.want)
		}
	}
}

// D7: an answer of only unusable addresses is a bad answer that says why
// (not "records only for other names", not NODATA), each refused record is
// counted in Stats.Refused (dropped_records_total{reason="address"}), and
// one warning names them.
func TestWatcherRefusesUnusableAddresses(t *testing.T) {
	srv := dnstest.Start(t, `
		mapped.example. 5 IN AAAA ::ffff:127.0.0.9
		unspec6.example. 5 IN AAAA ::
		mcast.example. 5 IN AAAA ff02::1
		zero.example. 5 IN A 0.0.0.0
		zeronet.example. 5 IN A 0.1.2.3
		bcast.example. 5 IN A 255.255.255.255
		class-e.example. 5 IN A 240.0.0.1
		_http._tcp.port0.example. 5 IN SRV 0 100 0 t.port0.example.
		t.port0.example. 5 IN A 10.9.0.1
		_http._tcp.port0bare.example. 5 IN SRV 0 100 0 nowhere.example.
		_http._tcp.mappedglue.example. 5 IN SRV 0 100 8080 t.mappedglue.example.
		t.mappedglue.example. 5 IN AAAA ::ffff:10.9.0.1
	`)
	for _, tc := range []struct{ ref, reason string }{
		{"mapped.example.:80", RefusedIPv4Mapped},
		{"unspec6.example.:80", RefusedUnspecified},
		{"mcast.example.:80", RefusedMulticast},
		{"zero.example.:80", RefusedUnspecified},
		{"zeronet.example.:80", RefusedUnspecified},
		{"bcast.example.:80", RefusedReserved},
		{"class-e.example.:80", RefusedReserved},
		{"port0.example.:http", RefusedPort0},
		{"port0bare.example.:http", RefusedPort0},
		{"mappedglue.example.:http", RefusedIPv4Mapped},
	} {
		w, logs := startWatcher(t, srv, tc.ref, func(c *Config) { c.Resolver.Timeout = 10 * time.Second })
		s := refreshNow(t, w)
		if len(s.Endpoints) != 0 || s.Outcome != OutcomeBadAnswer || s.Err == nil || !strings.Contains(s.Err.Error(), "("+tc.reason+")") {
			t.Errorf("%s: [%s] %s %v; want bad_answer naming %s", tc.ref, dials(s.Endpoints), s.Outcome, s.Err, tc.reason)
			continue
		}
		if st := w.Status().Stats; st.Refused == 0 || st.Refused < st.LookupCount() {
			t.Errorf("%s: Stats.Refused %d after %d lookups, want one a lookup at least", tc.ref, st.Refused, st.LookupCount())
		}
		if warns := logs.FilterMessageSnippet("not allowed").All(); len(warns) != 1 || !strings.Contains(fmt.Sprint(warns[0].ContextMap()["refused"]), tc.reason) {
			t.Errorf("%s: warnings %v; want one naming %s", tc.ref, observedMessages(logs), tc.reason)
		}
	}
}

// D11: the address policy runs before the cut to MaxEndpoints: 4,000 loopback
// A records must not crowd out 200 good AAAA ones.
func TestWatcherPolicyBeforeCap(t *testing.T) {
	var zone strings.Builder
	for i := range 4000 {
		fmt.Fprintf(&zone, "big.example. 5 IN A 127.0.%d.%d\n", i/250, i%250+1)
	}
	for i := range 200 {
		fmt.Fprintf(&zone, "big.example. 5 IN AAAA fd00::%x\n", i+1)
	}
	srv := dnstest.Start(t, zone.String())
	w, _ := startWatcher(t, srv, "big.example.:80", func(c *Config) { c.Resolver.Timeout = 10 * time.Second })
	s := refreshNow(t, w)
	if len(s.Endpoints) != 200 || s.Err != nil {
		t.Fatalf("%d endpoints (%v); want the 200 good AAAA ones", len(s.Endpoints), s.Err)
	}
	if st := w.Status().Stats; st.Refused < 4000 {
		t.Errorf("Stats.Refused %d, want 4000 a lookup", st.Refused)
	}
}
