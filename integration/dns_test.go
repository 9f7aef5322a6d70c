package integration

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// clusterZone is what CoreDNS serves for the objects TestClusterDNSAnswers
// applies, as zone-file text: {vN} is the IPv4 address of VM N, {wN} its
// IPv6 address, {dN} and {eN} those addresses dashed (the SRV target names of
// endpoints without a hostname). It is loaded as it is into dnstest.
const clusterZone = `
frontend.dnsshape.svc.cluster.local.             5 IN A   {v1}
frontend.dnsshape.svc.cluster.local.             5 IN A   {v2}
_http._tcp.frontend.dnsshape.svc.cluster.local.  5 IN SRV 0 50 8001 fe1.frontend.dnsshape.svc.cluster.local.
_http._tcp.frontend.dnsshape.svc.cluster.local.  5 IN SRV 0 50 8001 {d2}.frontend.dnsshape.svc.cluster.local.
frontend.dnsshape.svc.cluster.local.             5 IN SRV 0 50 8001 fe1.frontend.dnsshape.svc.cluster.local.
frontend.dnsshape.svc.cluster.local.             5 IN SRV 0 50 8001 {d2}.frontend.dnsshape.svc.cluster.local.
fe1.frontend.dnsshape.svc.cluster.local.         5 IN A   {v1}
{d2}.frontend.dnsshape.svc.cluster.local.        5 IN A   {v2}

half.dnsshape.svc.cluster.local.                 5 IN A   {v1}
_http._tcp.half.dnsshape.svc.cluster.local.      5 IN SRV 0 100 8001 {d1}.half.dnsshape.svc.cluster.local.
{d1}.half.dnsshape.svc.cluster.local.            5 IN A   {v1}

dual.dnsshape.svc.cluster.local.                 5 IN A    {v3}
dual.dnsshape.svc.cluster.local.                 5 IN A    {v4}
dual.dnsshape.svc.cluster.local.                 5 IN AAAA {w3}
dual.dnsshape.svc.cluster.local.                 5 IN AAAA {w4}
_http._tcp.dual.dnsshape.svc.cluster.local.      5 IN SRV 0 25 8001 {d3}.dual.dnsshape.svc.cluster.local.
_http._tcp.dual.dnsshape.svc.cluster.local.      5 IN SRV 0 25 8001 {d4}.dual.dnsshape.svc.cluster.local.
_http._tcp.dual.dnsshape.svc.cluster.local.      5 IN SRV 0 25 8001 {e3}.dual.dnsshape.svc.cluster.local.
_http._tcp.dual.dnsshape.svc.cluster.local.      5 IN SRV 0 25 8001 {e4}.dual.dnsshape.svc.cluster.local.
{d3}.dual.dnsshape.svc.cluster.local.            5 IN A    {v3}
{d4}.dual.dnsshape.svc.cluster.local.            5 IN A    {v4}
{e3}.dual.dnsshape.svc.cluster.local.            5 IN AAAA {w3}
{e4}.dual.dnsshape.svc.cluster.local.            5 IN AAAA {w4}
`

// dnsCase is one question and the reply it must get, as zone-file text:
// the answer section, the A/AAAA records in the additional section, and for
// negative replies the SOA in the authority section (serial left out).
type dnsCase struct {
	name       string
	qname      string // relative to dnsshape.svc.cluster.local.
	qtype      uint16
	rcode      int
	answer     string
	additional string
	soa        bool
}

const soaText = "cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 0 7200 1800 86400 5"

func clusterDNSCases() []dnsCase {
	z := ".dnsshape.svc.cluster.local."
	cases := []dnsCase{
		{name: "two ready endpoints: A", qname: "frontend", qtype: dns.TypeA,
			answer: "frontend" + z + " 5 IN A {v1}\nfrontend" + z + " 5 IN A {v2}"},
		{name: "named port: SRV with hostname and dashed-IP targets, glue in ADDITIONAL", qname: "_http._tcp.frontend", qtype: dns.TypeSRV,
			answer: "_http._tcp.frontend" + z + " 5 IN SRV 0 50 8001 fe1.frontend" + z + "\n" +
				"_http._tcp.frontend" + z + " 5 IN SRV 0 50 8001 {d2}.frontend" + z,
			additional: "fe1.frontend" + z + " 5 IN A {v1}\n{d2}.frontend" + z + " 5 IN A {v2}"},
		{name: "SRV without _port._proto: every named port", qname: "frontend", qtype: dns.TypeSRV,
			answer: "frontend" + z + " 5 IN SRV 0 50 8001 fe1.frontend" + z + "\n" +
				"frontend" + z + " 5 IN SRV 0 50 8001 {d2}.frontend" + z,
			additional: "fe1.frontend" + z + " 5 IN A {v1}\n{d2}.frontend" + z + " 5 IN A {v2}"},
		{name: "per-endpoint hostname: A", qname: "fe1.frontend", qtype: dns.TypeA,
			answer: "fe1.frontend" + z + " 5 IN A {v1}"},
		{name: "IPv4-only service: AAAA is NODATA with SOA", qname: "frontend", qtype: dns.TypeAAAA, soa: true},
		{name: "one endpoint not ready: only the ready one", qname: "half", qtype: dns.TypeA,
			answer: "half" + z + " 5 IN A {v1}"},
		{name: "one endpoint not ready: SRV weight 100", qname: "_http._tcp.half", qtype: dns.TypeSRV,
			answer:     "_http._tcp.half" + z + " 5 IN SRV 0 100 8001 {d1}.half" + z,
			additional: "{d1}.half" + z + " 5 IN A {v1}"},
		{name: "dual-stack: A", qname: "dual", qtype: dns.TypeA,
			answer: "dual" + z + " 5 IN A {v3}\ndual" + z + " 5 IN A {v4}"},
		{name: "dual-stack: AAAA", qname: "dual", qtype: dns.TypeAAAA,
			answer: "dual" + z + " 5 IN AAAA {w3}\ndual" + z + " 5 IN AAAA {w4}"},
		{name: "dual-stack: SRV weight 25 over both families", qname: "_http._tcp.dual", qtype: dns.TypeSRV,
			answer: "_http._tcp.dual" + z + " 5 IN SRV 0 25 8001 {d3}.dual" + z + "\n" +
				"_http._tcp.dual" + z + " 5 IN SRV 0 25 8001 {d4}.dual" + z + "\n" +
				"_http._tcp.dual" + z + " 5 IN SRV 0 25 8001 {e3}.dual" + z + "\n" +
				"_http._tcp.dual" + z + " 5 IN SRV 0 25 8001 {e4}.dual" + z,
			additional: "{d3}.dual" + z + " 5 IN A {v3}\n{d4}.dual" + z + " 5 IN A {v4}\n" +
				"{e3}.dual" + z + " 5 IN AAAA {w3}\n{e4}.dual" + z + " 5 IN AAAA {w4}"},
	}
	for _, name := range []string{"none", "empty", "noslice", "nosuchservice"} {
		for _, q := range []struct {
			prefix string
			qtype  uint16
		}{{"", dns.TypeA}, {"_http._tcp.", dns.TypeSRV}} {
			cases = append(cases, dnsCase{name: fmt.Sprintf("%s%s %s: NXDOMAIN with SOA", q.prefix, name, dns.TypeToString[q.qtype]),
				qname: q.prefix + name, qtype: q.qtype, rcode: dns.RcodeNameError, soa: true})
		}
	}
	return cases
}

// zoneVars fills the placeholders of clusterZone and the cases with the
// addresses of four VMs.
func zoneVars(v4, v6 [4]string) *strings.Replacer {
	dashed := func(ip string) string { return strings.ReplaceAll(strings.ReplaceAll(ip, ".", "-"), ":", "-") }
	var pairs []string
	for i := range 4 {
		n := strconv.Itoa(i + 1)
		pairs = append(pairs, "{v"+n+"}", v4[i], "{w"+n+"}", v6[i], "{d"+n+"}", dashed(v4[i]), "{e"+n+"}", dashed(v6[i]))
	}
	return strings.NewReplacer(pairs...)
}

// TestClusterDNSAnswers asks the real CoreDNS, serving Services and
// EndpointSlices from the real kube-apiserver, and dnstest, serving
// clusterZone, the same questions: both must give the replies of one table
// (docs/kube-dns-answers.md), so "dnstest answers like CoreDNS" is checked by the
// cases that the unit tests rely on.
func TestClusterDNSAnswers(t *testing.T) {
	t.Run("dnstest", func(t *testing.T) {
		// Addresses only named in answers; nothing is dialed.
		vars := zoneVars([4]string{"10.231.1.2", "10.231.2.2", "10.231.3.2", "10.231.4.2"},
			[4]string{"fd00:231:0:1::2", "fd00:231:0:2::2", "fd00:231:0:3::2", "fd00:231:0:4::2"})
		srv := dnstest.Start(t, vars.Replace(clusterZone))
		for _, tc := range clusterDNSCases() {
			if err := checkDNSCase(srv.Addr, tc, vars); err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
		}
	})
	t.Run("coredns", func(t *testing.T) {
		s := requireSuite(t)
		// The plugin at its default TTL (5 s), which dnstest and the unit
		// tests use; the suite's own CoreDNS has kubeadm's ttl 30.
		server := s.startCoreDNSDefaultTTL(t)
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
		var v4, v6 [4]string
		for i, v := range vms {
			v4[i], v6[i] = v.v4, v.v6
		}
		vars := zoneVars(v4, v6)
		for _, tc := range clusterDNSCases() {
			// A change reaches CoreDNS within tens of milliseconds; allow a
			// little for the objects just applied.
			if err := waitFor(5*time.Second, 100*time.Millisecond, func() error { return checkDNSCase(server, tc, vars) }); err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
		}
		if t.Failed() {
			t.Logf("----- CoreDNS log, last lines -----\n%s", s.coredns.tail(40))
		}
	})
}

// checkDNSCase asks server the case's question over UDP with EDNS0 (1232
// bytes), as the plugin does, and compares the reply with the case.
func checkDNSCase(server string, tc dnsCase, vars *strings.Replacer) error {
	qname := tc.qname + ".dnsshape.svc.cluster.local."
	m, err := query(server, qname, tc.qtype)
	if err != nil {
		return err
	}
	if m.Rcode != tc.rcode {
		return fmt.Errorf("rcode %s, want %s:\n%v", dns.RcodeToString[m.Rcode], dns.RcodeToString[tc.rcode], m)
	}
	if !m.Authoritative {
		return fmt.Errorf("answer not authoritative:\n%v", m)
	}
	var additional []dns.RR
	for _, rr := range m.Extra {
		if t := rr.Header().Rrtype; t == dns.TypeA || t == dns.TypeAAAA {
			additional = append(additional, rr)
		}
	}
	wantSOA := ""
	if tc.soa {
		wantSOA = soaText
	}
	for _, sec := range []struct {
		name string
		got  []dns.RR
		want string
	}{
		{"ANSWER", m.Answer, vars.Replace(tc.answer)},
		{"ADDITIONAL", additional, vars.Replace(tc.additional)},
		{"AUTHORITY", m.Ns, wantSOA},
	} {
		got, want := zoneLines(sec.got), zoneText(sec.want)
		if !slices.Equal(got, want) {
			return fmt.Errorf("%s section:\n  %s\nwant\n  %s\nreply:\n%v", sec.name,
				strings.Join(got, "\n  "), strings.Join(want, "\n  "), m)
		}
	}
	return nil
}

// zoneLines writes records as sorted zone-file lines (SOA serials as 0, they
// change with every restart).
func zoneLines(rrs []dns.RR) []string {
	var out []string
	for _, rr := range rrs {
		if soa, ok := rr.(*dns.SOA); ok {
			c := *soa
			c.Serial = 0
			rr = &c
		}
		out = append(out, strings.Join(strings.Fields(rr.String()), " "))
	}
	slices.Sort(out)
	return out
}

// zoneText parses zone-file lines (one record a line) the way zoneLines writes records.
func zoneText(text string) []string {
	var rrs []dns.RR
	for _, line := range strings.Split(text, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		rr, err := dns.NewRR(line)
		if err != nil {
			panic(fmt.Sprintf("fixture %q: %v", line, err))
		}
		rrs = append(rrs, rr)
	}
	return zoneLines(rrs)
}

// query asks server over UDP with EDNS0 (1232 bytes), as the plugin does.
func query(server, name string, qtype uint16) (*dns.Msg, error) {
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	q.SetEdns0(1232, false)
	c := &dns.Client{Timeout: 2 * time.Second}
	m, _, err := c.Exchange(q, server)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", name, dns.TypeToString[qtype], err)
	}
	return m, nil
}
