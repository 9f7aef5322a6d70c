package discovery

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseService(t *testing.T) {
	def := Defaults{Namespace: "bbs", ClusterDomain: "cluster.local"}
	for _, tc := range []struct {
		ref              string
		fqdn, qname, str string
		port             uint16
		err              string
	}{
		{ref: "frontend:8001", fqdn: "frontend.bbs.svc.cluster.local.", qname: "frontend.bbs.svc.cluster.local.", port: 8001},
		{ref: "frontend.other:8001", fqdn: "frontend.other.svc.cluster.local.", qname: "frontend.other.svc.cluster.local.", port: 8001},
		{ref: "backend.bbs:http", fqdn: "backend.bbs.svc.cluster.local.", qname: "_http._tcp.backend.bbs.svc.cluster.local.", str: "backend.bbs.svc.cluster.local:http"},
		{ref: "backend.bbs.svc:http", fqdn: "backend.bbs.svc.cluster.local.", qname: "_http._tcp.backend.bbs.svc.cluster.local."},
		{ref: "backend.bbs.svc.cluster.local:http", fqdn: "backend.bbs.svc.cluster.local.", qname: "_http._tcp.backend.bbs.svc.cluster.local."},
		{ref: "web-0.web.ns.svc.cluster.local:80", fqdn: "web-0.web.ns.svc.cluster.local.", qname: "web-0.web.ns.svc.cluster.local.", port: 80},
		{ref: "api.example.com.:443", fqdn: "api.example.com.", qname: "api.example.com.", port: 443, str: "api.example.com:443"},
		{ref: "Frontend.BBS:8001", fqdn: "frontend.bbs.svc.cluster.local.", qname: "frontend.bbs.svc.cluster.local.", port: 8001},
		{ref: "x:65535", fqdn: "x.bbs.svc.cluster.local.", qname: "x.bbs.svc.cluster.local.", port: 65535},
		{ref: "frontend", err: "missing port"},
		{ref: "frontend:", err: "missing port"},
		{ref: ":80", err: "empty service name"},
		{ref: "frontend:0", err: "not a number in 1-65535"},
		{ref: "frontend:65536", err: "not a number in 1-65535"},
		// D6: Kubernetes port names may start with a digit; any letter makes a name.
		{ref: "frontend:80x", fqdn: "frontend.bbs.svc.cluster.local.", qname: "_80x._tcp.frontend.bbs.svc.cluster.local."},
		{ref: "frontend:8http", fqdn: "frontend.bbs.svc.cluster.local.", qname: "_8http._tcp.frontend.bbs.svc.cluster.local."},
		{ref: "frontend:1a", fqdn: "frontend.bbs.svc.cluster.local.", qname: "_1a._tcp.frontend.bbs.svc.cluster.local."},
		{ref: "frontend:8-", err: "'-' may not lead"},
		// D13: not lowercased into ASCII (U+212A KELVIN SIGN would become 'k').
		{ref: "\u212aube:80", err: "not ASCII"},
		{ref: "fr\u00e9:80", err: "not ASCII"},
		{ref: "frontend:-1", err: "port name"},
		{ref: "frontend:HTTP", err: "lowercase"},
		{ref: "frontend:http-", err: "'-' may not lead"},
		{ref: "frontend:h--p", err: "'-' may not lead"},
		{ref: "frontend:abcdefghijklmnop", err: "longer than 15"},
		{ref: "frontend:a:b", err: "more than one ':'"},
		{ref: "[::1]:80", err: "IP address"},
		{ref: "10.0.0.1:80", err: "not a service reference"},
		{ref: "fr ontend:80", err: "not a valid DNS name"},
		{ref: "a..b:80", err: "not a valid DNS name"},
		{ref: "-a.b:80", err: "must not start or end"},
		{ref: "{http.request.host}:80", err: "has '{'"},
		{ref: strings.Repeat("a", 64) + ":80", err: "1-63"},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			s, err := ParseService(tc.ref, def)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), tc.ref) {
					t.Fatalf("ParseService(%q) = %+v, %v; want error containing %q and the reference", tc.ref, s, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.FQDN != tc.fqdn || s.QName() != tc.qname || s.Port != tc.port {
				t.Fatalf("ParseService(%q) = fqdn %q qname %q port %d; want %q %q %d", tc.ref, s.FQDN, s.QName(), s.Port, tc.fqdn, tc.qname, tc.port)
			}
			if tc.str != "" && s.String() != tc.str {
				t.Fatalf("String() = %q, want %q", s.String(), tc.str)
			}
		})
	}
}

func TestDetect(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pod := write("pod.conf", "search bbs.svc.corp.example svc.corp.example corp.example\nnameserver 10.96.0.10\noptions ndots:5\n")
	nsFile := write("namespace", "payments\n")
	plain := write("plain.conf", "nameserver 192.0.2.1\nnameserver 2001:db8::1\n")
	zoned := write("zoned.conf", "nameserver fe80::1%lo\n")

	for _, tc := range []struct {
		name string
		env  Environment
		want Detected
	}{
		{"pod without namespace file", Environment{ResolvConf: pod, NamespaceFile: filepath.Join(dir, "none")},
			Detected{Defaults: Defaults{"bbs", "corp.example"}, Resolvers: []string{"10.96.0.10:53"}}},
		{"pod with namespace file", Environment{ResolvConf: pod, NamespaceFile: nsFile},
			Detected{Defaults: Defaults{"payments", "corp.example"}, Resolvers: []string{"10.96.0.10:53"}}},
		{"outside a cluster", Environment{ResolvConf: plain, NamespaceFile: filepath.Join(dir, "none")},
			Detected{Defaults: Defaults{"default", "cluster.local"}, Resolvers: []string{"192.0.2.1:53", "[2001:db8::1]:53"}}},
		{"zoned nameserver", Environment{ResolvConf: zoned, NamespaceFile: filepath.Join(dir, "none")},
			Detected{Defaults: Defaults{"default", "cluster.local"}, Resolvers: []string{"[fe80::1%lo]:53"}}},
		{"no resolv.conf", Environment{ResolvConf: filepath.Join(dir, "none"), NamespaceFile: filepath.Join(dir, "none")},
			Detected{Defaults: Defaults{"default", "cluster.local"}, Resolvers: []string{"127.0.0.1:53"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.env.Detect()
			if got.Namespace != tc.want.Namespace || got.ClusterDomain != tc.want.ClusterDomain ||
				strings.Join(got.Resolvers, ",") != strings.Join(tc.want.Resolvers, ",") {
				t.Fatalf("Detect() = %+v, want %+v", got, tc.want)
			}
			for _, r := range got.Resolvers { // what the configuration then checks
				if _, err := NormalizeServer(r); err != nil {
					t.Fatalf("resolver %q from resolv.conf refused: %v", r, err)
				}
			}
		})
	}
}

func TestNormalizeServer(t *testing.T) {
	for in, want := range map[string]string{
		"10.96.0.10":      "10.96.0.10:53",
		"10.96.0.10:5353": "10.96.0.10:5353",
		"::1":             "[::1]:53",
		"[::1]":           "[::1]:53",
		"[::1]:54":        "[::1]:54",
		"dns.local":       "dns.local:53",
		"dns.local:1053":  "dns.local:1053",
		// D13: zones, bare or in brackets (resolv.conf may hold them).
		"fe80::1%lo":        "[fe80::1%lo]:53",
		"[fe80::1%lo]":      "[fe80::1%lo]:53",
		"[fe80::1%lo]:5353": "[fe80::1%lo]:5353",
		// D5: a bare IPv6 address that cannot be read as address:port.
		"fd00::10": "[fd00::10]:53",
		"::53":     "[::53]:53",
	} {
		got, err := NormalizeServer(in)
		if err != nil || got != want {
			t.Errorf("NormalizeServer(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", ":53", "10.0.0.1:0", "10.0.0.1:x", "10.0.0.1:70000", "a:b:c",
		"::1:53", "fd00::1:5353", // D5: ambiguous, write [::1]:53
	} {
		if got, err := NormalizeServer(in); err == nil {
			t.Errorf("NormalizeServer(%q) = %q, want an error", in, got)
		}
	}
}
