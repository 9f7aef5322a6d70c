package discovery

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// bbsZone is namespace bbs as CoreDNS's kubernetes plugin serves it (ttl 5):
// see docs/kube-dns-answers.md.
const bbsZone = `
; frontend: two ready endpoints, named port http 8001, one with hostname fe1
frontend.bbs.svc.cluster.local.	5	IN	A	10.1.0.2
frontend.bbs.svc.cluster.local.	5	IN	A	10.1.0.3
_http._tcp.frontend.bbs.svc.cluster.local.	5	IN	SRV	0 50 8001 fe1.frontend.bbs.svc.cluster.local.
_http._tcp.frontend.bbs.svc.cluster.local.	5	IN	SRV	0 50 8001 10-1-0-3.frontend.bbs.svc.cluster.local.
frontend.bbs.svc.cluster.local.	5	IN	SRV	0 50 8001 fe1.frontend.bbs.svc.cluster.local.
frontend.bbs.svc.cluster.local.	5	IN	SRV	0 50 8001 10-1-0-3.frontend.bbs.svc.cluster.local.
fe1.frontend.bbs.svc.cluster.local.	5	IN	A	10.1.0.2
10-1-0-3.frontend.bbs.svc.cluster.local.	5	IN	A	10.1.0.3

; backend: one ready endpoint of two (the other is ready: false), SRV weight 100
backend.bbs.svc.cluster.local.	5	IN	A	10.1.0.27
_http._tcp.backend.bbs.svc.cluster.local.	5	IN	SRV	0 100 8004 10-1-0-27.backend.bbs.svc.cluster.local.
backend.bbs.svc.cluster.local.	5	IN	SRV	0 100 8004 10-1-0-27.backend.bbs.svc.cluster.local.
10-1-0-27.backend.bbs.svc.cluster.local.	5	IN	A	10.1.0.27

; dual: dual-stack, two v4 and two v6 endpoints, port web 8080, weight 25
dual.bbs.svc.cluster.local.	5	IN	A	10.1.0.10
dual.bbs.svc.cluster.local.	5	IN	A	10.1.0.11
dual.bbs.svc.cluster.local.	5	IN	AAAA	fd00::14
dual.bbs.svc.cluster.local.	5	IN	AAAA	fd00::15
_web._tcp.dual.bbs.svc.cluster.local.	5	IN	SRV	0 25 8080 10-1-0-10.dual.bbs.svc.cluster.local.
_web._tcp.dual.bbs.svc.cluster.local.	5	IN	SRV	0 25 8080 10-1-0-11.dual.bbs.svc.cluster.local.
_web._tcp.dual.bbs.svc.cluster.local.	5	IN	SRV	0 25 8080 fd00--14.dual.bbs.svc.cluster.local.
_web._tcp.dual.bbs.svc.cluster.local.	5	IN	SRV	0 25 8080 fd00--15.dual.bbs.svc.cluster.local.
10-1-0-10.dual.bbs.svc.cluster.local.	5	IN	A	10.1.0.10
10-1-0-11.dual.bbs.svc.cluster.local.	5	IN	A	10.1.0.11
fd00--14.dual.bbs.svc.cluster.local.	5	IN	AAAA	fd00::14
fd00--15.dual.bbs.svc.cluster.local.	5	IN	AAAA	fd00::15

; ext: ExternalName example.test
ext.bbs.svc.cluster.local.	5	IN	CNAME	example.test.
`

func lookup(t *testing.T, srv *dnstest.Server, ref string, v4, v6 bool) (Result, error) {
	t.Helper()
	svc, err := ParseService(ref, Defaults{Namespace: "bbs"})
	if err != nil {
		t.Fatal(err)
	}
	r := &Resolver{Servers: []string{srv.Addr}, Timeout: time.Second}
	return r.Lookup(context.Background(), svc, v4, v6)
}

func dials(eps []Endpoint) string {
	var s []string
	for _, e := range eps {
		s = append(s, e.Dial)
	}
	return strings.Join(s, " ")
}

func TestLookupKubeDNSCases(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	for _, tc := range []struct {
		name, ref string
		v4, v6    bool
		outcome   Outcome
		want      string // dial addresses, sorted
		targets   string // SRV targets, if any
		ttl       time.Duration
	}{
		{"A, two ready endpoints", "frontend:8001", true, false, OutcomeSuccess, "10.1.0.2:8001 10.1.0.3:8001", "", 5 * time.Second},
		{"A and AAAA of an IPv4-only service (AAAA is NODATA)", "frontend:8001", true, true, OutcomeSuccess, "10.1.0.2:8001 10.1.0.3:8001", "", 5 * time.Second},
		{"SRV named port, targets from the additional section", "frontend.bbs:http", true, true, OutcomeSuccess, "10.1.0.2:8001 10.1.0.3:8001",
			"fe1.frontend.bbs.svc.cluster.local. 10-1-0-3.frontend.bbs.svc.cluster.local.", 5 * time.Second},
		{"per-pod hostname", "fe1.frontend.bbs.svc.cluster.local:8001", true, true, OutcomeSuccess, "10.1.0.2:8001", "", 5 * time.Second},
		{"one endpoint not ready", "backend:http", true, true, OutcomeSuccess, "10.1.0.27:8004", "", 5 * time.Second},
		{"AAAA only of an IPv4-only service: NODATA", "frontend:8001", false, true, OutcomeNoData, "", "", 5 * time.Second},
		{"no such service: NXDOMAIN", "nosuch:80", true, true, OutcomeNXDomain, "", "", 5 * time.Second},
		{"no such named port: NXDOMAIN", "frontend:grpc", true, true, OutcomeNXDomain, "", "", 5 * time.Second},
		{"dual-stack A+AAAA", "dual:8080", true, true, OutcomeSuccess, "10.1.0.10:8080 10.1.0.11:8080 [fd00::14]:8080 [fd00::15]:8080", "", 5 * time.Second},
		{"dual-stack, ipv6 only", "dual:8080", false, true, OutcomeSuccess, "[fd00::14]:8080 [fd00::15]:8080", "", 5 * time.Second},
		{"dual-stack SRV", "dual:web", true, true, OutcomeSuccess, "10.1.0.10:8080 10.1.0.11:8080 [fd00::14]:8080 [fd00::15]:8080", "", 5 * time.Second},
		{"dual-stack SRV, ipv4 glue only", "dual:web", true, false, OutcomeSuccess, "10.1.0.10:8080 10.1.0.11:8080", "", 5 * time.Second},
		{"ExternalName: CNAME to a name without addresses", "ext:80", true, false, OutcomeNoData, "", "", 5 * time.Second},
		{"ExternalName SRV: NXDOMAIN", "ext:http", true, true, OutcomeNXDomain, "", "", 5 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := lookup(t, srv, tc.ref, tc.v4, tc.v6)
			if err != nil {
				t.Fatal(err)
			}
			if res.Outcome != tc.outcome || dials(res.Endpoints) != tc.want || res.TTL != tc.ttl {
				t.Fatalf("got outcome %s endpoints [%s] ttl %s; want %s [%s] %s", res.Outcome, dials(res.Endpoints), res.TTL, tc.outcome, tc.want, tc.ttl)
			}
			if res.Server != srv.Addr {
				t.Errorf("Server = %q, want %q", res.Server, srv.Addr)
			}
			if tc.targets != "" {
				var got []string
				for _, e := range res.Endpoints {
					got = append(got, e.Target)
				}
				if strings.Join(got, " ") != tc.targets {
					t.Errorf("targets %v, want %s", got, tc.targets)
				}
			}
		})
	}
}

// zoneOf makes a service with n endpoints (10.2.x.y), A and SRV records with glue.
func zoneOf(name string, n int) string {
	var b strings.Builder
	for i := range n {
		ip := fmt.Sprintf("10.2.%d.%d", i/250, i%250+1)
		host := strings.ReplaceAll(ip, ".", "-")
		fmt.Fprintf(&b, "%s.bbs.svc.cluster.local. 5 IN A %s\n", name, ip)
		fmt.Fprintf(&b, "_http._tcp.%s.bbs.svc.cluster.local. 5 IN SRV 0 1 8080 %s.%s.bbs.svc.cluster.local.\n", name, host, name)
		fmt.Fprintf(&b, "%s.%s.bbs.svc.cluster.local. 5 IN A %s\n", host, name, ip)
	}
	return b.String()
}

func TestLookupBigServiceUsesTCP(t *testing.T) {
	srv := dnstest.Start(t, zoneOf("big", 1000))
	// A: 1,000 records fit one TCP reply. SRV: 1,000 records with their glue do
	// not even fit 64 KiB, so CoreDNS sends all SRV records, part of the glue and
	// TC over TCP; the Service name's A records (over TCP too) fill in the rest.
	for ref, tcp := range map[string]int{"big:8080": 1, "big:http": 2} {
		t.Run(ref, func(t *testing.T) {
			before := srv.TCPQueries()
			res, err := lookup(t, srv, ref, true, false)
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Endpoints) != 1000 {
				t.Fatalf("got %d endpoints, want all 1000", len(res.Endpoints))
			}
			if res.Truncated != tcp || srv.TCPQueries() != before+int64(tcp) {
				t.Fatalf("truncated %d, TCP queries %d: want %d truncated UDP replies asked again over TCP", res.Truncated, srv.TCPQueries()-before, tcp)
			}
			for i := 1; i < len(res.Endpoints); i++ {
				if res.Endpoints[i-1].IP.Compare(res.Endpoints[i].IP) >= 0 {
					t.Fatalf("endpoints not sorted at %d: %s, %s", i, res.Endpoints[i-1].Dial, res.Endpoints[i].Dial)
				}
			}
		})
	}
}

func TestLookupSmallEDNSStillComplete(t *testing.T) {
	srv := dnstest.Start(t, zoneOf("mid", 40))
	svc, _ := ParseService("mid:http", Defaults{Namespace: "bbs"})
	r := &Resolver{Servers: []string{srv.Addr}, UDPSize: 512}
	res, err := r.Lookup(context.Background(), svc, true, true)
	if err != nil || len(res.Endpoints) != 40 || res.Truncated != 1 {
		t.Fatalf("got %d endpoints, %d truncated, %v; want 40 after one TCP retry", len(res.Endpoints), res.Truncated, err)
	}
}

func TestLookupIgnoresRecordsForOtherNames(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		m := new(dns.Msg)
		m.SetReply(q)
		name := q.Question[0].Name
		switch q.Question[0].Qtype {
		case dns.TypeA:
			m.Answer = []dns.RR{
				rr(t, name+" 5 IN A 10.1.0.2"),
				rr(t, "evil.example. 5 IN A 192.0.2.66"),
				rr(t, "backend.bbs.svc.cluster.local. 5 IN A 192.0.2.67"),
			}
		case dns.TypeSRV:
			m.Answer = []dns.RR{
				rr(t, name+" 5 IN SRV 0 50 8001 a.frontend.bbs.svc.cluster.local."),
				rr(t, "_http._tcp.evil.example. 5 IN SRV 0 50 8001 b.frontend.bbs.svc.cluster.local."),
			}
			m.Extra = []dns.RR{
				rr(t, "a.frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.5"),
				rr(t, "b.frontend.bbs.svc.cluster.local. 5 IN A 192.0.2.68"),
				rr(t, "evil.example. 5 IN A 192.0.2.69"),
			}
		default:
			return false
		}
		w.WriteMsg(m)
		return true
	})
	res, err := lookup(t, srv, "frontend:8001", true, false)
	if err != nil || dials(res.Endpoints) != "10.1.0.2:8001" {
		t.Fatalf("A: got [%s], %v; want only the asked name's record", dials(res.Endpoints), err)
	}
	res, err = lookup(t, srv, "frontend:http", true, false)
	if err != nil || dials(res.Endpoints) != "10.1.0.5:8001" {
		t.Fatalf("SRV: got [%s], %v; want only the asked name's SRV and its target's glue", dials(res.Endpoints), err)
	}
}

func TestLookupSRVTargetWithoutGlue(t *testing.T) {
	srv := dnstest.Start(t, `
_http._tcp.web.bbs.svc.cluster.local. 5 IN SRV 0 50 8080 web-0.web.bbs.svc.cluster.local.
_http._tcp.web.bbs.svc.cluster.local. 5 IN SRV 0 50 8080 gone.web.bbs.svc.cluster.local.
web-0.web.bbs.svc.cluster.local. 3 IN A 10.1.0.9
`)
	// Serve the SRV answer without its additional section.
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		if q.Question[0].Qtype != dns.TypeSRV {
			return false
		}
		m := new(dns.Msg)
		m.SetReply(q)
		m.Answer = []dns.RR{
			rr(t, "_http._tcp.web.bbs.svc.cluster.local. 5 IN SRV 0 50 8080 web-0.web.bbs.svc.cluster.local."),
			rr(t, "_http._tcp.web.bbs.svc.cluster.local. 5 IN SRV 0 50 8080 gone.web.bbs.svc.cluster.local."),
		}
		w.WriteMsg(m)
		return true
	})
	res, err := lookup(t, srv, "web:http", true, false)
	if err != nil {
		t.Fatal(err)
	}
	if dials(res.Endpoints) != "10.1.0.9:8080" || res.TTL != 3*time.Second || res.Queries != 3 {
		t.Fatalf("got [%s] ttl %s after %d queries; want the target looked up (gone one NXDOMAIN, skipped), ttl 3s, 3 queries",
			dials(res.Endpoints), res.TTL, res.Queries)
	}
}

// SRV targets without glue are asked for both families, one by one or, when
// there are more than MaxTargetLookups of the Service's own endpoint names on
// one port, through the Service name's A and AAAA records. Each family's
// answer counts; a family that fails fails the lookup, with the name asked.
func TestLookupSRVTargetsWithoutGlueDualStack(t *testing.T) {
	const zone = `
web.bbs.svc.cluster.local. 30 IN A 10.1.0.9
web.bbs.svc.cluster.local. 20 IN AAAA fd00::9
web-0.web.bbs.svc.cluster.local. 30 IN A 10.1.0.9
web-0.web.bbs.svc.cluster.local. 20 IN AAAA fd00::9
web-1.web.bbs.svc.cluster.local. 30 IN A 10.1.0.10
`
	const qname = "_http._tcp.web.bbs.svc.cluster.local."
	var many []string
	for i := range MaxTargetLookups + 1 {
		many = append(many, fmt.Sprintf("10-1-1-%d.web.bbs.svc.cluster.local.", i))
	}
	for _, tc := range []struct {
		name     string
		targets  []string
		failAAAA string // a name whose AAAA question gets SERVFAIL
		// want: dial addresses (each with its SRV target, if any), or the error.
		want    string
		zone    string // instead of the dual-stack zone
		ttl     time.Duration
		queries int
	}{
		// web-1 has no AAAA record: its NODATA does not shorten the TTL.
		{"one by one", []string{"web-0.web.bbs.svc.cluster.local.", "web-1.web.bbs.svc.cluster.local."}, "",
			"10.1.0.9:8080/web-0.web.bbs.svc.cluster.local. 10.1.0.10:8080/web-1.web.bbs.svc.cluster.local. [fd00::9]:8080/web-0.web.bbs.svc.cluster.local.",
			"", 20 * time.Second, 5},
		{"one by one, AAAA fails", []string{"web-0.web.bbs.svc.cluster.local."}, "web-0.web.bbs.svc.cluster.local.",
			"SRV target web-0.web.bbs.svc.cluster.local of _http._tcp.web.bbs.svc.cluster.local: ", "", 0, 3},
		{"names fallback", many, "", "10.1.0.9:8080/ [fd00::9]:8080/", "", 20 * time.Second, 3},
		{"names fallback, AAAA fails", many, "web.bbs.svc.cluster.local.",
			"addresses of web.bbs.svc.cluster.local for SRV targets without glue: ", "", 0, 3},
		// An IPv4-only Service: the AAAA NODATA (negative TTL 5 s) does not
		// shorten the TTL, as for targets looked up one by one.
		{"names fallback, IPv4 only", many, "", "10.1.0.9:8080/", "web.bbs.svc.cluster.local. 30 IN A 10.1.0.9\n", 30 * time.Second, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := dnstest.Start(t, cmp.Or(tc.zone, zone))
			srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
				m := new(dns.Msg)
				switch question := q.Question[0]; {
				case question.Qtype == dns.TypeSRV && question.Name == qname: // the records without their glue
					m.SetReply(q)
					for _, target := range tc.targets {
						m.Answer = append(m.Answer, rr(t, qname+" 30 IN SRV 0 50 8080 "+target))
					}
				case question.Qtype == dns.TypeAAAA && question.Name == tc.failAAAA:
					m.SetRcode(q, dns.RcodeServerFailure)
				default:
					return false
				}
				hostileWrite(w, q, m) // truncated over UDP, as a server does
				return true
			})
			res, err := lookup(t, srv, "web:http", true, true)
			got := ""
			for _, e := range res.Endpoints {
				got += " " + e.Dial + "/" + e.Target
			}
			if err != nil {
				got = err.Error()
			}
			if !strings.HasPrefix(strings.TrimSpace(got), tc.want) || err == nil && res.TTL != tc.ttl || res.Queries != tc.queries {
				t.Fatalf("got %s, ttl %s after %d queries; want %s, ttl %s after %d", got, res.TTL, res.Queries, tc.want, tc.ttl, tc.queries)
			}
		})
	}
}

func TestLookupTransientErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		setup   func(*dnstest.Server)
		outcome Outcome
	}{
		{"SERVFAIL", func(s *dnstest.Server) { s.Fail(dns.RcodeServerFailure) }, OutcomeServFail},
		{"REFUSED", func(s *dnstest.Server) { s.Fail(dns.RcodeRefused) }, OutcomeRefused},
		{"NOTIMP", func(s *dnstest.Server) { s.Fail(dns.RcodeNotImplemented) }, OutcomeBadAnswer},
		{"timeout", func(s *dnstest.Server) { s.Mute(true) }, OutcomeTimeout},
		{"connection refused", func(s *dnstest.Server) { s.Close() }, OutcomeNetwork},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := dnstest.Start(t, bbsZone)
			tc.setup(srv)
			svc, _ := ParseService("frontend:8001", Defaults{Namespace: "bbs"})
			r := &Resolver{Servers: []string{srv.Addr}, Timeout: 200 * time.Millisecond}
			_, err := r.Lookup(context.Background(), svc, true, false)
			var le *LookupError
			if !errors.As(err, &le) || le.Outcome != tc.outcome || le.Server != srv.Addr {
				t.Fatalf("err = %v; want a LookupError with outcome %s from %s", err, tc.outcome, srv.Addr)
			}
			if !strings.Contains(err.Error(), srv.Addr) || !strings.Contains(err.Error(), "frontend.bbs.svc.cluster.local") {
				t.Fatalf("error %q should name the DNS server and the name asked", err)
			}
		})
	}
}

func TestResolverFailsOver(t *testing.T) {
	good := dnstest.Start(t, bbsZone)
	bad := dnstest.Start(t, bbsZone)
	bad.Fail(dns.RcodeServerFailure)
	// A UDP port nobody listens on: "connection refused".
	pc, _ := net.ListenPacket("udp", "127.0.0.1:0")
	dead := pc.LocalAddr().String()
	pc.Close()

	svc, _ := ParseService("frontend:8001", Defaults{Namespace: "bbs"})
	r := &Resolver{Servers: []string{dead, bad.Addr, good.Addr}, Timeout: 300 * time.Millisecond}
	res, err := r.Lookup(context.Background(), svc, true, false)
	if err != nil || res.Server != good.Addr || len(res.Endpoints) != 2 {
		t.Fatalf("got %d endpoints from %q, %v; want 2 from the third server", len(res.Endpoints), res.Server, err)
	}
	// The server that answered is asked first next time.
	badBefore := bad.Queries()
	if _, err := r.Lookup(context.Background(), svc, true, false); err != nil {
		t.Fatal(err)
	}
	if bad.Queries() != badBefore {
		t.Fatalf("the failing server was asked again although the last good one answers")
	}
}

func rr(t *testing.T, s string) dns.RR {
	t.Helper()
	r, err := dns.NewRR(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
