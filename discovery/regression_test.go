package discovery

// Regression tests for bugs found by the fuzz targets and the hostile-DNS
// tests; each names what used to go wrong.

import (
	"errors"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// SRV records whose only target does not resolve used to give outcome
// "success" with no endpoints: metrics counted a success, and the error handed
// to requests said "no ready endpoints (SUCCESS …)".
func TestRegressionSRVWithoutAddressesIsNoData(t *testing.T) {
	srv := dnstest.Start(t, `_http._tcp.lost.bbs.svc.cluster.local. 5 IN SRV 0 100 8080 gone.lost.bbs.svc.cluster.local.`)
	res, err := lookup(t, srv, "lost:http", true, true)
	if err != nil || len(res.Endpoints) != 0 || res.Outcome != OutcomeNoData {
		t.Fatalf("got %d endpoints, outcome %s, %v; want none, nodata", len(res.Endpoints), res.Outcome, err)
	}
}

// An empty reply with TC set over TCP too used to count as NODATA, so a broken
// server emptied the endpoint set; it says nothing about the Service.
func TestRegressionEmptyTruncatedTCPReplyIsTransient(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		m := new(dns.Msg)
		m.SetReply(q)
		m.Truncated = true
		w.WriteMsg(m)
		return true
	})
	_, err := lookup(t, srv, "frontend:8001", true, false)
	var le *LookupError
	if !errors.As(err, &le) || le.Outcome != OutcomeBadAnswer {
		t.Fatalf("err = %v; want a bad_answer LookupError", err)
	}
}

// TTLs with the top bit set were taken as 68 years (clamped to refresh_max);
// RFC 2181 §8 says to treat them as 0.
func TestRegressionTTLTopBitMeansZero(t *testing.T) {
	for ttl, want := range map[uint32]time.Duration{
		0: time.Second, 1: time.Second, 30: 30 * time.Second, 1<<31 - 1: (1<<31 - 1) * time.Second,
		1 << 31: time.Second, 1<<32 - 1: time.Second,
	} {
		if got := ttlOf(&dns.RR_Header{Ttl: ttl}); got != want {
			t.Errorf("TTL %d: %s, want %s", ttl, got, want)
		}
	}
	m := new(dns.Msg)
	m.Ns = []dns.RR{&dns.SOA{Hdr: dns.RR_Header{Ttl: 1 << 31}, Minttl: 5}}
	if got := negativeTTL(m); got != time.Second {
		t.Errorf("SOA TTL 2^31, MINIMUM 5: negative TTL %s, want 1s", got)
	}
}

// One 64 KiB reply pairing 1,500 SRV ports with 2,000 glue addresses of the
// same target used to make 3 million endpoints before the cut to MaxEndpoints:
// about 1 GiB allocated and seconds of CPU on every refresh.
func TestRegressionSRVGlueProductIsBounded(t *testing.T) {
	q := "_http._tcp.product.bbs.svc.cluster.local."
	m := new(dns.Msg)
	m.SetQuestion(q, dns.TypeSRV)
	for i := range 1500 {
		m.Answer = append(m.Answer, &dns.SRV{Hdr: dns.RR_Header{Name: q, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: 5},
			Port: uint16(1000 + i), Target: "t."})
	}
	for i := range 2000 {
		m.Extra = append(m.Extra, &dns.A{Hdr: dns.RR_Header{Name: "t.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5},
			A: net.IPv4(10, 3, byte(i>>8), byte(i))})
	}
	svc := Service{FQDN: "product.bbs.svc.cluster.local.", PortName: "http"}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	res := Result{}
	eps, _ := endpointsFromReply(m, svc, dns.TypeSRV, []uint16{dns.TypeA}, &res)
	eps = finish(eps, &res.Dropped)
	runtime.ReadMemStats(&after)
	if len(eps) != MaxEndpoints || res.Dropped < 1500*2000-maxCandidates {
		t.Fatalf("%d endpoints, %d dropped; want MaxEndpoints, the rest dropped", len(eps), res.Dropped)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 16<<20 {
		t.Fatalf("allocated %d MiB for one reply", alloc>>20)
	}
}
