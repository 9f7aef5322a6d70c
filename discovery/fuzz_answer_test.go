package discovery

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The names FuzzAnswer asks about when the message carries no usable question.
const (
	fuzzFQDN = "frontend.bbs.svc.cluster.local."
	fuzzSRV  = "_http._tcp.frontend.bbs.svc.cluster.local."
)

// fuzzReply packs a reply to qname/qtype from zone-file lines; sections are
// separated by a line "--" (answer, authority, additional).
func fuzzReply(tb testing.TB, qname string, qtype uint16, rcode int, zone string) []byte {
	tb.Helper()
	m := new(dns.Msg)
	m.SetQuestion(qname, qtype)
	m.Response, m.Authoritative, m.Rcode = true, true, rcode
	section := 0
	for line := range strings.SplitSeq(zone, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "":
			continue
		case line == "--":
			section++
			continue
		}
		rr, err := dns.NewRR(line)
		if err != nil {
			tb.Fatalf("%q: %v", line, err)
		}
		switch section {
		case 0:
			m.Answer = append(m.Answer, rr)
		case 1:
			m.Ns = append(m.Ns, rr)
		default:
			m.Extra = append(m.Extra, rr)
		}
	}
	m.Compress = true
	b, err := m.Pack()
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func fuzzAnswerSeeds(tb testing.TB) [][]byte {
	var many, manySRV strings.Builder
	for i := range 5000 {
		fmt.Fprintf(&many, "%s 5 IN A 10.%d.%d.%d\n", fuzzFQDN, i>>16, i>>8&255, i&255)
	}
	for i := range 200 {
		fmt.Fprintf(&manySRV, "%s 5 IN SRV 0 1 %d t%d.frontend.bbs.svc.cluster.local.\n", fuzzSRV, 8000+i, i%3)
	}
	manySRV.WriteString("--\n--\n")
	for i := range 200 {
		fmt.Fprintf(&manySRV, "t%d.frontend.bbs.svc.cluster.local. 5 IN A 10.2.%d.%d\n", i%3, i>>8, i&255)
	}
	seeds := [][]byte{
		// The shapes of docs/kube-dns-answers.md.
		fuzzReply(tb, fuzzFQDN, dns.TypeA, dns.RcodeSuccess, `
			frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.2
			frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.3`),
		fuzzReply(tb, fuzzSRV, dns.TypeSRV, dns.RcodeSuccess, `
			_http._tcp.frontend.bbs.svc.cluster.local. 5 IN SRV 0 50 8001 fe1.frontend.bbs.svc.cluster.local.
			_http._tcp.frontend.bbs.svc.cluster.local. 5 IN SRV 0 50 8001 10-1-0-3.frontend.bbs.svc.cluster.local.
			--
			--
			fe1.frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.2
			10-1-0-3.frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.3`),
		fuzzReply(tb, fuzzSRV, dns.TypeSRV, dns.RcodeSuccess, `
			_http._tcp.frontend.bbs.svc.cluster.local. 5 IN SRV 0 25 8080 10-1-0-10.frontend.bbs.svc.cluster.local.
			_http._tcp.frontend.bbs.svc.cluster.local. 5 IN SRV 0 25 8080 fd00--14.frontend.bbs.svc.cluster.local.
			_http._tcp.frontend.bbs.svc.cluster.local. 5 IN SRV 0 25 8080 nohost.frontend.bbs.svc.cluster.local.
			--
			--
			10-1-0-10.frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.10
			fd00--14.frontend.bbs.svc.cluster.local. 5 IN AAAA fd00::14`),
		fuzzReply(tb, fuzzFQDN, dns.TypeAAAA, dns.RcodeSuccess, `
			--
			cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1700000000 7200 1800 86400 5`),
		fuzzReply(tb, fuzzFQDN, dns.TypeA, dns.RcodeNameError, `
			--
			cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1700000000 7200 1800 86400 5`),
		fuzzReply(tb, fuzzFQDN, dns.TypeA, dns.RcodeSuccess, `
			frontend.bbs.svc.cluster.local. 5 IN CNAME example.test.
			example.test. 300 IN A 192.0.2.1`),
		// Hostile: records for other names, a CNAME loop, unusable addresses,
		// extreme TTLs, SRV with port 0 or target ".", mixed case.
		fuzzReply(tb, fuzzFQDN, dns.TypeA, dns.RcodeSuccess, `
			frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.2
			evil.example. 5 IN A 6.6.6.6
			frontend.bbs.svc.cluster.local. 5 IN AAAA fd00::1
			--
			frontend.bbs.svc.cluster.local. 5 IN A 6.6.6.7
			--
			frontend.bbs.svc.cluster.local. 5 IN A 6.6.6.8`),
		fuzzReply(tb, fuzzFQDN, dns.TypeA, dns.RcodeSuccess, `
			frontend.bbs.svc.cluster.local. 5 IN CNAME a.example.
			a.example. 5 IN CNAME b.example.
			b.example. 5 IN CNAME frontend.bbs.svc.cluster.local.
			b.example. 5 IN A 10.9.9.9`),
		fuzzReply(tb, fuzzFQDN, dns.TypeA, dns.RcodeSuccess, `
			frontend.bbs.svc.cluster.local. 5 IN CNAME c1.example.
			c1.example. 5 IN CNAME c2.example.
			c2.example. 5 IN CNAME c3.example.
			c3.example. 5 IN CNAME c4.example.
			c4.example. 5 IN CNAME c5.example.
			c5.example. 5 IN CNAME c6.example.
			c6.example. 5 IN CNAME c7.example.
			c7.example. 5 IN CNAME c8.example.
			c8.example. 5 IN CNAME c9.example.
			c8.example. 5 IN A 10.8.8.8
			c9.example. 5 IN A 10.9.9.9`),
		fuzzReply(tb, fuzzFQDN, dns.TypeA, dns.RcodeSuccess, `
			FRONTEND.bbs.svc.cluster.local. 0 IN A 0.0.0.0
			frontend.bbs.svc.cluster.local. 0 IN A 224.0.0.1
			frontend.bbs.svc.cluster.local. 2147483648 IN A 10.1.0.2
			frontend.bbs.svc.cluster.local. 4294967295 IN A 10.1.0.2
			frontend.bbs.svc.cluster.local. 0 IN A 255.255.255.255`),
		fuzzReply(tb, fuzzFQDN, dns.TypeAAAA, dns.RcodeSuccess, `
			frontend.bbs.svc.cluster.local. 5 IN AAAA ::ffff:10.1.0.2
			frontend.bbs.svc.cluster.local. 5 IN AAAA ::
			frontend.bbs.svc.cluster.local. 5 IN AAAA ff02::1
			frontend.bbs.svc.cluster.local. 5 IN AAAA fe80::1
			frontend.bbs.svc.cluster.local. 5 IN AAAA fd00::1`),
		fuzzReply(tb, fuzzSRV, dns.TypeSRV, dns.RcodeSuccess, `
			_http._tcp.frontend.bbs.svc.cluster.local. 5 IN SRV 0 0 0 a.frontend.bbs.svc.cluster.local.
			_http._tcp.frontend.bbs.svc.cluster.local. 5 IN SRV 0 0 80 .
			_http._tcp.frontend.bbs.svc.cluster.local. 5 IN SRV 0 0 80 A.Frontend.bbs.svc.cluster.local.
			_http._tcp.frontend.bbs.svc.cluster.local. 5 IN SRV 0 0 80 a.frontend.bbs.svc.cluster.local.
			other.example. 5 IN SRV 0 0 81 a.frontend.bbs.svc.cluster.local.
			--
			--
			a.frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.5
			a.frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.5
			b.frontend.bbs.svc.cluster.local. 5 IN A 6.6.6.6`),
		fuzzReply(tb, fuzzFQDN, dns.TypeA, dns.RcodeSuccess, many.String()),
		fuzzReply(tb, fuzzSRV, dns.TypeSRV, dns.RcodeSuccess, manySRV.String()),
		fuzzReply(tb, fuzzFQDN, dns.TypeA, dns.RcodeServerFailure, ""),
	}
	// Raw: header only; counts that lie; a compression pointer to itself.
	hdr := []byte{0x12, 0x34, 0x84, 0x00, 0, 1, 0xff, 0xff, 0, 0, 0, 0}
	q := append([]byte{8}, "frontend"...)
	q = append(q, 0, 0, 1, 0, 1)
	seeds = append(seeds,
		hdr[:12],
		append(slices.Clone(hdr), q...),
		append(append(slices.Clone(hdr), q...), 0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 0, 0, 1),
		append(append(slices.Clone(hdr), q...), 0xc0, 0x1e, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 0, 0, 1),
	)
	return seeds
}

// FuzzAnswer feeds arbitrary DNS messages through the code Lookup uses to turn
// a reply into endpoints (endpointsFromReply, admit, then finish). Whatever comes in,
// the endpoints must be sorted, unique, bounded, and made only of addresses
// that the message gives for the name asked (or its CNAMEs, or the SRV
// targets), with the right port.
func FuzzAnswer(f *testing.F) {
	for _, s := range fuzzAnswerSeeds(f) {
		f.Add(s, uint8(0))
	}
	f.Fuzz(func(t *testing.T, wire []byte, mode uint8) {
		m := new(dns.Msg)
		if err := m.Unpack(wire); err != nil {
			return // the resolver reports these as bad_answer
		}
		svc, qtype, types := fuzzQuestion(m, mode)
		res := Result{Outcome: OutcomeNXDomain}
		eps, bare := endpointsFromReply(m, svc, qtype, types, &res)
		got := finish(res.admit(svc, slices.Clone(eps), nil), &res.Dropped)
		checkEndpoints(t, m, svc, qtype, types, got, bare, res)

		// The set does not depend on the order of the records (CoreDNS's
		// loadbalance shuffles them), unless a bound cut it or a name has two
		// CNAMEs (then which one is followed is up to the order).
		if res.Dropped > 0 || ambiguousCNAMEs(m) {
			return
		}
		r := m.Copy()
		slices.Reverse(r.Answer)
		slices.Reverse(r.Extra)
		rres := Result{Outcome: OutcomeNXDomain}
		reps, rbare := endpointsFromReply(r, svc, qtype, types, &rres)
		rgot := finish(rres.admit(svc, reps, nil), &rres.Dropped)
		if rres.Dropped == 0 && (!slices.EqualFunc(got, rgot, sameDial) || len(bare) != len(rbare) || res.Outcome != rres.Outcome || res.TTL != rres.TTL) {
			t.Fatalf("record order changed the result:\n%v %s %s bare=%d\n%v %s %s bare=%d",
				dialsOf(got), res.Outcome, res.TTL, len(bare), dialsOf(rgot), rres.Outcome, rres.TTL, len(rbare))
		}
	})
}

// fuzzQuestion picks what is being asked: the message's own question when it
// is an A, AAAA or SRV question for a name a Service can have, else one chosen
// by mode. mode also picks the wanted IP versions.
func fuzzQuestion(m *dns.Msg, mode uint8) (Service, uint16, []uint16) {
	types := [][]uint16{{dns.TypeA, dns.TypeAAAA}, {dns.TypeA}, {dns.TypeAAAA}}[mode>>2%3]
	qtype := []uint16{dns.TypeA, dns.TypeAAAA, dns.TypeSRV, dns.TypeSRV}[mode&3]
	qname := ""
	if len(m.Question) == 1 {
		switch q := m.Question[0]; q.Qtype {
		case dns.TypeA, dns.TypeAAAA, dns.TypeSRV:
			if _, ok := dns.IsDomainName(q.Name); ok && dns.IsFqdn(q.Name) {
				qname, qtype = strings.ToLower(q.Name), q.Qtype
			}
		}
	}
	if qtype != dns.TypeSRV {
		if qname == "" {
			qname = fuzzFQDN
		}
		if !slices.Contains(types, qtype) {
			types = append(types, qtype)
		}
		return Service{FQDN: qname, Port: 8001}, qtype, types
	}
	svc := Service{FQDN: strings.TrimPrefix(fuzzSRV, "_http._tcp."), PortName: "http"}
	if port, rest, ok := strings.Cut(qname, "._tcp."); ok && strings.HasPrefix(port, "_") && len(port) > 1 && rest != "" {
		svc = Service{FQDN: rest, PortName: port[1:]}
	}
	return svc, qtype, types
}

func checkEndpoints(t *testing.T, m *dns.Msg, svc Service, qtype uint16, types []uint16, got []Endpoint, bare []*dns.SRV, res Result) {
	t.Helper()
	if len(got) > MaxEndpoints {
		t.Fatalf("%d endpoints, more than MaxEndpoints", len(got))
	}
	if len(bare) > MaxEndpoints {
		t.Fatalf("%d SRV targets to look up, more than MaxEndpoints", len(bare))
	}
	answer, extra := addrIndex(m.Answer), addrIndex(m.Extra)
	owners, srvOwners := reachable(m, svc.FQDN), reachable(m, svc.QName())
	srvs := map[string]bool{} // "target port" of the question's SRV records
	for _, rr := range m.Answer {
		if s, ok := rr.(*dns.SRV); ok && srvOwners[strings.ToLower(s.Hdr.Name)] {
			srvs[strings.ToLower(s.Target)+" "+strconv.Itoa(int(s.Port))] = true
		}
	}
	for i, e := range got {
		if i > 0 {
			p := got[i-1]
			if c := p.IP.Compare(e.IP); c > 0 || c == 0 && p.Port >= e.Port {
				t.Fatalf("endpoints not sorted and unique: %s before %s", p.Dial, e.Dial)
			}
		}
		if !e.IP.IsValid() || e.IP.IsUnspecified() || e.IP.IsMulticast() || e.IP.Is4In6() || e.IP.Zone() != "" {
			t.Fatalf("unusable address %v", e.IP)
		}
		if e.Port == 0 || e.Dial != net.JoinHostPort(e.IP.String(), strconv.Itoa(int(e.Port))) {
			t.Fatalf("bad port or dial address: %+v", e)
		}
		want := dns.TypeA
		if e.IP.Is6() {
			want = dns.TypeAAAA
		}
		if qtype != dns.TypeSRV {
			if want != qtype || e.Port != svc.Port || e.Target != "" {
				t.Fatalf("A/AAAA endpoint %+v for a %s question on port %d", e, dns.TypeToString[qtype], svc.Port)
			}
			if !slices.ContainsFunc(slices.Collect(maps.Keys(owners)), func(n string) bool { return answer[n][e.IP] }) {
				t.Fatalf("%s is not an address of %s (or its CNAMEs) in the answer section", e.IP, svc.FQDN)
			}
			continue
		}
		if !slices.Contains(types, want) {
			t.Fatalf("%s: IP version not asked for (%v)", e.Dial, types)
		}
		if !srvs[e.Target+" "+strconv.Itoa(int(e.Port))] {
			t.Fatalf("%+v: no SRV record of %s with that target and port", e, svc.QName())
		}
		if !extra[e.Target][e.IP] {
			t.Fatalf("%+v: address is not the target's glue", e)
		}
	}
	for _, s := range bare {
		if s.Port == 0 || s.Target == "." {
			t.Fatalf("unusable SRV record to look up: %v", s)
		}
		if len(extra[strings.ToLower(s.Target)]) > 0 {
			t.Fatalf("SRV target %s has glue but is to be looked up", s.Target)
		}
	}
	switch {
	case m.Rcode == dns.RcodeNameError:
		if len(got) > 0 || len(bare) > 0 || res.Outcome != OutcomeNXDomain {
			t.Fatalf("NXDOMAIN reply gave %d endpoints, %d targets, outcome %s", len(got), len(bare), res.Outcome)
		}
	case len(got) > 0:
		if res.Outcome != OutcomeSuccess {
			t.Fatalf("%d endpoints with outcome %s", len(got), res.Outcome)
		}
		if res.TTL < time.Second || res.TTL > (1<<31-1)*time.Second {
			t.Fatalf("TTL %s out of range", res.TTL)
		}
	}
}

// reachable is every name the question's records may be owned by: the name and
// what CNAMEs in the answer section lead to, at most MaxCNAMEs steps away.
func reachable(m *dns.Msg, name string) map[string]bool {
	seen := map[string]bool{strings.ToLower(name): true}
	frontier := []string{strings.ToLower(name)}
	for range MaxCNAMEs {
		var next []string
		for _, rr := range m.Answer {
			if c, ok := rr.(*dns.CNAME); ok && slices.Contains(frontier, strings.ToLower(c.Hdr.Name)) && !seen[strings.ToLower(c.Target)] {
				seen[strings.ToLower(c.Target)] = true
				next = append(next, strings.ToLower(c.Target))
			}
		}
		frontier = next
	}
	return seen
}

// addrIndex maps owner names (lowercased) to the addresses of their A and
// AAAA records in rrs. Every A/AAAA owner is present, even with an address
// that does not parse (as the zero Addr).
func addrIndex(rrs []dns.RR) map[string]map[netip.Addr]bool {
	idx := map[string]map[netip.Addr]bool{}
	for _, rr := range rrs {
		var b net.IP
		switch rr := rr.(type) {
		case *dns.A:
			b = rr.A
		case *dns.AAAA:
			b = rr.AAAA
		default:
			continue
		}
		n := strings.ToLower(rr.Header().Name)
		if idx[n] == nil {
			idx[n] = map[netip.Addr]bool{}
		}
		a, _ := netip.AddrFromSlice(b)
		idx[n][a.Unmap()] = true
	}
	return idx
}

func ambiguousCNAMEs(m *dns.Msg) bool {
	seen := map[string]bool{}
	for _, rr := range m.Answer {
		if c, ok := rr.(*dns.CNAME); ok {
			n := strings.ToLower(c.Hdr.Name)
			if seen[n] {
				return true
			}
			seen[n] = true
		}
	}
	return false
}

func sameDial(a, b Endpoint) bool { return a.Dial == b.Dial }

func dialsOf(eps []Endpoint) []string {
	var s []string
	for _, e := range eps {
		s = append(s, e.Dial)
	}
	return s
}
