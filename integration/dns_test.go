package integration

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestClusterDNSAnswers checks that the real CoreDNS answers for headless
// Services the way kube-dns-answers.md, the project's notes (the shapes the unit
// tests' in-process DNS server copies) says it does.
func TestClusterDNSAnswers(t *testing.T) {
	s := requireSuite(t)
	vms := s.useVMs(t, 1, 2, 3, 4)
	const ns = "dnsshape"
	ports := map[string]int{"http": 8001}
	s.namespace(t, ns)
	s.apply(t,
		headlessService(ns, "frontend", ports),
		endpointSlice(ns, "frontend", "frontend-1", "IPv4", ports,
			endpoint{addr: vms[0].v4, hostname: "fe1", ready: true}, endpoint{addr: vms[1].v4, ready: true}),
		headlessService(ns, "half", ports),
		endpointSlice(ns, "half", "half-1", "IPv4", ports,
			endpoint{addr: vms[0].v4, ready: true}, endpoint{addr: vms[1].v4, ready: false}),
		headlessService(ns, "none", ports),
		endpointSlice(ns, "none", "none-1", "IPv4", ports,
			endpoint{addr: vms[0].v4, ready: false}, endpoint{addr: vms[1].v4, ready: false}),
		headlessService(ns, "empty", ports),
		endpointSlice(ns, "empty", "empty-1", "IPv4", ports),
		headlessService(ns, "noslice", ports),
		headlessService(ns, "dual", ports),
		endpointSlice(ns, "dual", "dual-v4", "IPv4", ports,
			endpoint{addr: vms[2].v4, ready: true}, endpoint{addr: vms[3].v4, ready: true}),
		endpointSlice(ns, "dual", "dual-v6", "IPv6", ports,
			endpoint{addr: vms[2].v6, ready: true}, endpoint{addr: vms[3].v6, ready: true}),
	)
	zone := ns + ".svc.cluster.local."
	dashed := func(ip string) string { return strings.ReplaceAll(strings.ReplaceAll(ip, ".", "-"), ":", "-") }

	cases := []struct {
		name  string
		check func() error
	}{
		{"two ready endpoints: A", func() error {
			m, err := s.query("frontend."+zone, dns.TypeA)
			if err != nil {
				return err
			}
			return wantAddrs(m, dns.RcodeSuccess, vms[0].v4, vms[1].v4)
		}},
		{"named port: SRV with hostname and dashed-IP targets, glue in ADDITIONAL", func() error {
			m, err := s.query("_http._tcp.frontend."+zone, dns.TypeSRV)
			if err != nil {
				return err
			}
			return wantSRV(m, 50, 8001, map[string]string{
				"fe1.frontend." + zone:                  vms[0].v4,
				dashed(vms[1].v4) + ".frontend." + zone: vms[1].v4,
			})
		}},
		{"SRV without _port._proto: every named port", func() error {
			m, err := s.query("frontend."+zone, dns.TypeSRV)
			if err != nil {
				return err
			}
			return wantSRV(m, 50, 8001, map[string]string{
				"fe1.frontend." + zone:                  vms[0].v4,
				dashed(vms[1].v4) + ".frontend." + zone: vms[1].v4,
			})
		}},
		{"per-endpoint hostname: A", func() error {
			m, err := s.query("fe1.frontend."+zone, dns.TypeA)
			if err != nil {
				return err
			}
			return wantAddrs(m, dns.RcodeSuccess, vms[0].v4)
		}},
		{"IPv4-only service: AAAA is NODATA with SOA", func() error {
			m, err := s.query("frontend."+zone, dns.TypeAAAA)
			if err != nil {
				return err
			}
			if err := wantAddrs(m, dns.RcodeSuccess); err != nil {
				return err
			}
			return wantSOA(m)
		}},
		{"one endpoint not ready: only the ready one, SRV weight 100", func() error {
			m, err := s.query("half."+zone, dns.TypeA)
			if err != nil {
				return err
			}
			if err := wantAddrs(m, dns.RcodeSuccess, vms[0].v4); err != nil {
				return err
			}
			m, err = s.query("_http._tcp.half."+zone, dns.TypeSRV)
			if err != nil {
				return err
			}
			return wantSRV(m, 100, 8001, map[string]string{dashed(vms[0].v4) + ".half." + zone: vms[0].v4})
		}},
		{"dual-stack: A, AAAA, SRV weight 25 over both families", func() error {
			m, err := s.query("dual."+zone, dns.TypeA)
			if err != nil {
				return err
			}
			if err := wantAddrs(m, dns.RcodeSuccess, vms[2].v4, vms[3].v4); err != nil {
				return err
			}
			m, err = s.query("dual."+zone, dns.TypeAAAA)
			if err != nil {
				return err
			}
			if err := wantAddrs(m, dns.RcodeSuccess, vms[2].v6, vms[3].v6); err != nil {
				return err
			}
			m, err = s.query("_http._tcp.dual."+zone, dns.TypeSRV)
			if err != nil {
				return err
			}
			targets := map[string]string{}
			for _, v := range vms[2:4] {
				targets[dashed(v.v4)+".dual."+zone] = v.v4
				targets[dashed(v.v6)+".dual."+zone] = v.v6
			}
			return wantSRV(m, 25, 8001, targets)
		}},
	}
	for _, name := range []string{"none", "empty", "noslice", "nosuchservice"} {
		for _, q := range []struct {
			prefix string
			qtype  uint16
		}{{"", dns.TypeA}, {"_http._tcp.", dns.TypeSRV}} {
			qname := q.prefix + name + "." + zone
			cases = append(cases, struct {
				name  string
				check func() error
			}{fmt.Sprintf("%s %s: NXDOMAIN with SOA", qname, dns.TypeToString[q.qtype]), func() error {
				m, err := s.query(qname, q.qtype)
				if err != nil {
					return err
				}
				if err := wantAddrs(m, dns.RcodeNameError); err != nil {
					return err
				}
				return wantSOA(m)
			}})
		}
	}
	for _, tc := range cases {
		// A change reaches CoreDNS within tens of milliseconds; allow a
		// little for the objects just applied.
		if err := waitFor(5*time.Second, 100*time.Millisecond, tc.check); err != nil {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	if t.Failed() {
		t.Logf("----- CoreDNS log, last lines -----\n%s", s.coredns.tail(40))
	}
}

// query asks the suite's CoreDNS over UDP with EDNS0 (1232 bytes), as the
// plugin does.
func (s *suite) query(name string, qtype uint16) (*dns.Msg, error) {
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	q.SetEdns0(1232, false)
	c := &dns.Client{Timeout: 2 * time.Second}
	m, _, err := c.Exchange(q, s.dnsAddr())
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", name, dns.TypeToString[qtype], err)
	}
	return m, nil
}

// wantAddrs checks the rcode, the authoritative bit, and that the answer
// holds exactly the given A/AAAA addresses, each with TTL 5.
func wantAddrs(m *dns.Msg, rcode int, addrs ...string) error {
	if m.Rcode != rcode {
		return fmt.Errorf("rcode %s, want %s:\n%v", dns.RcodeToString[m.Rcode], dns.RcodeToString[rcode], m)
	}
	if !m.Authoritative {
		return fmt.Errorf("answer not authoritative:\n%v", m)
	}
	var got []string
	for _, rr := range m.Answer {
		switch r := rr.(type) {
		case *dns.A:
			got = append(got, r.A.String())
		case *dns.AAAA:
			got = append(got, r.AAAA.String())
		default:
			return fmt.Errorf("unexpected record %v", rr)
		}
		if rr.Header().Ttl != 5 {
			return fmt.Errorf("TTL %d, want 5: %v", rr.Header().Ttl, rr)
		}
	}
	want := normalize(addrs)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		return fmt.Errorf("addresses %v, want %v:\n%v", got, want, m)
	}
	return nil
}

func normalize(addrs []string) []string {
	out := []string{}
	for _, a := range addrs {
		out = append(out, net.ParseIP(a).String())
	}
	slices.Sort(out)
	if len(out) == 0 {
		return nil
	}
	return out
}

// wantSRV checks SRV records: priority 0, the given weight and port, exactly
// the given targets, and each target's address in the ADDITIONAL section.
func wantSRV(m *dns.Msg, weight, port uint16, targets map[string]string) error {
	if m.Rcode != dns.RcodeSuccess {
		return fmt.Errorf("rcode %s, want NOERROR:\n%v", dns.RcodeToString[m.Rcode], m)
	}
	seen := map[string]bool{}
	for _, rr := range m.Answer {
		srv, ok := rr.(*dns.SRV)
		if !ok {
			return fmt.Errorf("unexpected record %v", rr)
		}
		if srv.Priority != 0 || srv.Weight != weight || srv.Port != port || srv.Hdr.Ttl != 5 {
			return fmt.Errorf("record %v, want TTL 5, priority 0, weight %d, port %d", srv, weight, port)
		}
		if _, ok := targets[srv.Target]; !ok {
			return fmt.Errorf("unexpected target %s, want one of %v:\n%v", srv.Target, targets, m)
		}
		seen[srv.Target] = true
	}
	if len(seen) != len(targets) || len(m.Answer) != len(targets) {
		return fmt.Errorf("%d SRV records for targets %v, want one for each of %v:\n%v", len(m.Answer), seen, targets, m)
	}
	glue := map[string]string{}
	for _, rr := range m.Extra {
		switch r := rr.(type) {
		case *dns.A:
			glue[r.Hdr.Name] = r.A.String()
		case *dns.AAAA:
			glue[r.Hdr.Name] = r.AAAA.String()
		}
	}
	for target, addr := range targets {
		if glue[target] != net.ParseIP(addr).String() {
			return fmt.Errorf("ADDITIONAL has %q for %s, want %s:\n%v", glue[target], target, addr, m)
		}
	}
	return nil
}

// wantSOA checks the SOA in the AUTHORITY section of a negative answer.
func wantSOA(m *dns.Msg) error {
	if len(m.Ns) != 1 {
		return fmt.Errorf("want one SOA in AUTHORITY:\n%v", m)
	}
	soa, ok := m.Ns[0].(*dns.SOA)
	if !ok || soa.Hdr.Name != "cluster.local." || soa.Ns != "ns.dns.cluster.local." ||
		soa.Mbox != "hostmaster.cluster.local." || soa.Refresh != 7200 || soa.Retry != 1800 ||
		soa.Expire != 86400 || soa.Minttl != 5 || soa.Hdr.Ttl != 5 {
		return fmt.Errorf("AUTHORITY %v, want cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. <serial> 7200 1800 86400 5", m.Ns[0])
	}
	return nil
}
