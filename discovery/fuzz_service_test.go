package discovery

import (
	"strconv"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

// FuzzParseService feeds arbitrary references and defaults to ParseService.
// Whatever it accepts must be a question DNS can carry: a valid absolute,
// lowercase name, within the wire limits, with either a port number or a port
// name, and parsing its fully qualified form again gives the same Service.
func FuzzParseService(f *testing.F) {
	for _, seed := range []struct{ ref, ns, domain string }{
		{"backend.bbs:http", "", ""},
		{"frontend.bbs:8001", "", ""},
		{"frontend:8001", "bbs", "cluster.local"},
		{"web-0.web.bbs.svc.cluster.local:https", "", ""},
		{"a.b.svc:80", "", "corp.example"},
		{"example.test.:443", "", ""},
		{"Frontend.BBS:8001", "", "Cluster.Local."},
		{"x:1", "default", "cluster.local"},
		{"x:65535", "", ""},
		{"x:65536", "", ""},
		{"x:0", "", ""},
		{"x:08", "", ""},
		{"x:-1", "", ""},
		{"x:http-", "", ""},
		{"x:a--b", "", ""},
		{"x:abcdefghijklmnop", "", ""},
		{":80", "", ""},
		{"x:", "", ""},
		{"x", "", ""},
		{"x:80:80", "", ""},
		{"[::1]:53", "", ""},
		{".:80", "", ""},
		{"..:80", "", ""},
		{"a..b:80", "", ""},
		{"-a.b:80", "", ""},
		{"a_b.c:80", "", ""},
		{"a\\046b.c:80", "", ""},
		{"é.bbs:80", "", ""},
		{strings.Repeat("a", 63) + ".bbs:80", "", ""},
		{strings.Repeat("a", 64) + ".bbs:80", "", ""},
		{strings.Repeat(strings.Repeat("a", 63)+".", 3) + strings.Repeat("b", 61) + ".:http", "", ""},
		{strings.Repeat(strings.Repeat("a", 63)+".", 3) + strings.Repeat("b", 61) + ".:1", "", ""},
		{"svc:http", strings.Repeat("n", 63), strings.Repeat("d", 63) + "." + strings.Repeat("e", 63)},
		{"svc:80", "a.b", ""},
		{"svc:80", "", "."},
		{"svc:80", "", "..local"},
	} {
		f.Add(seed.ref, seed.ns, seed.domain)
	}
	f.Fuzz(func(t *testing.T, ref, ns, domain string) {
		svc, err := ParseService(ref, Defaults{Namespace: ns, ClusterDomain: domain})
		if err != nil {
			if svc != (Service{}) {
				t.Fatalf("ParseService(%q) failed (%v) but returned %+v", ref, err, svc)
			}
			if !strings.Contains(err.Error(), strconv.Quote(ref)) {
				t.Fatalf("error %q does not name the reference %q", err, ref)
			}
			return
		}
		if svc.Ref != ref {
			t.Fatalf("Ref = %q, want %q", svc.Ref, ref)
		}
		if (svc.Port == 0) == (svc.PortName == "") {
			t.Fatalf("%q: want exactly one of Port (%d) and PortName (%q)", ref, svc.Port, svc.PortName)
		}
		if svc.FQDN != strings.ToLower(svc.FQDN) || !strings.HasSuffix(svc.FQDN, ".") || !dns.IsFqdn(svc.FQDN) {
			t.Fatalf("%q: FQDN %q is not an absolute lowercase name", ref, svc.FQDN)
		}
		if svc.FQDN == "." || strings.Contains(svc.FQDN, "..") {
			t.Fatalf("%q: FQDN %q has an empty label", ref, svc.FQDN)
		}
		// The name asked must fit in a DNS message: SetQuestion+Pack is what the
		// resolver does with it.
		q := new(dns.Msg)
		q.SetQuestion(svc.QName(), dns.TypeSRV)
		if _, err := q.Pack(); err != nil {
			t.Fatalf("%q: question %q cannot be sent: %v", ref, svc.QName(), err)
		}
		if n, ok := dns.IsDomainName(svc.QName()); !ok || n == 0 {
			t.Fatalf("%q: QName %q is not a domain name", ref, svc.QName())
		}
		// The fully qualified form is a fixed point.
		port := svc.PortName
		if port == "" {
			port = strconv.Itoa(int(svc.Port))
		}
		again, err := ParseService(svc.FQDN+":"+port, Defaults{})
		if err != nil {
			t.Fatalf("%q parsed to %q, which does not parse again: %v", ref, svc.FQDN+":"+port, err)
		}
		again.Ref = svc.Ref
		if again != svc {
			t.Fatalf("%q: reparsing %q gave %+v, want %+v", ref, svc.FQDN+":"+port, again, svc)
		}
	})
}

// A name that fits on its own but not once _port._tcp. is put in front of it
// could never be asked: the watcher would fail forever with a packing error.
func TestParseServiceSRVNameTooLong(t *testing.T) {
	fqdn := strings.Repeat(strings.Repeat("a", 63)+".", 3) + strings.Repeat("b", 61) + "."
	if _, err := ParseService(fqdn+":1", Defaults{}); err != nil {
		t.Fatalf("A/AAAA reference of 253 characters: %v", err)
	}
	_, err := ParseService(fqdn+":http", Defaults{})
	if err == nil || !strings.Contains(err.Error(), "longer than 253") {
		t.Fatalf("SRV reference whose _http._tcp name is too long: err = %v, want 'longer than 253'", err)
	}
}
