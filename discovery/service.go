package discovery

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/miekg/dns"
)

// Service is a parsed service reference: what to ask DNS and which port to dial.
type Service struct {
	// Ref is the reference as the user wrote it, e.g. "backend.bbs:http".
	Ref string
	// FQDN is the absolute name of the Service (or pod), with a trailing dot,
	// e.g. "backend.bbs.svc.cluster.local.".
	FQDN string
	// PortName is the named port for SRV lookups ("http"); empty for a numeric port.
	PortName string
	// Port is the numeric port dialed on every A/AAAA address; 0 for a named port.
	Port uint16
}

// SRV reports whether the Service is looked up through SRV records.
func (s Service) SRV() bool { return s.PortName != "" }

// QName is the DNS name asked: the FQDN for A/AAAA, _name._tcp.FQDN for SRV.
func (s Service) QName() string {
	if s.SRV() {
		return "_" + s.PortName + "._tcp." + s.FQDN
	}
	return s.FQDN
}

// String names the Service the way errors and logs show it.
func (s Service) String() string {
	if s.SRV() {
		return strings.TrimSuffix(s.FQDN, ".") + ":" + s.PortName
	}
	return strings.TrimSuffix(s.FQDN, ".") + ":" + strconv.Itoa(int(s.Port))
}

// Defaults are what a short reference is completed with.
type Defaults struct {
	Namespace     string // "default" when unknown
	ClusterDomain string // "cluster.local" when unknown
}

// ParseService parses a service reference:
//
//	svc:port            svc.<namespace>.svc.<cluster domain>
//	svc.ns:port         svc.ns.svc.<cluster domain>
//	a.b.svc:port        a.b.svc.<cluster domain>
//	a.b.c[.…]:port      taken as fully qualified (a per-pod name, or any DNS name)
//	name.:port          fully qualified
//
// A numeric port (1–65535) means A/AAAA records plus that port; a port name
// (an IANA service name, as Kubernetes requires for named ports) means the SRV
// records _name._tcp.<fqdn>.
func ParseService(ref string, def Defaults) (Service, error) {
	s := Service{Ref: ref}
	fail := func(format string, args ...any) (Service, error) {
		return Service{}, fmt.Errorf("service %q: "+format, append([]any{ref}, args...)...)
	}
	if h, _, _ := strings.Cut(ref, ":"); strings.HasPrefix(ref, "[") || net.ParseIP(h) != nil {
		return fail("an IP address is not a service reference: use reverse_proxy's own upstreams for fixed addresses")
	}
	host, port, ok := strings.Cut(ref, ":")
	if !ok || port == "" {
		return fail("missing port: write it as svc.namespace:8080 (A/AAAA records) or svc.namespace:http (SRV records of the named port)")
	}
	if strings.Contains(port, ":") {
		return fail("more than one ':'")
	}
	// Kubernetes port names may start with a digit ("8http"): only digits
	// make a number.
	if strings.Trim(port, "0123456789") == "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return fail("port %q is not a number in 1-65535", port)
		}
		s.Port = uint16(n)
	} else {
		if err := checkPortName(port); err != nil {
			return fail("port name %q: %v", port, err)
		}
		s.PortName = port
	}

	if def.Namespace == "" {
		def.Namespace = "default"
	}
	if def.ClusterDomain == "" {
		def.ClusterDomain = "cluster.local"
	}
	domain := strings.Trim(def.ClusterDomain, ".")
	if host == "" {
		return fail("empty service name")
	}
	var fqdn string
	switch labels := strings.Split(strings.TrimSuffix(host, "."), "."); {
	case strings.HasSuffix(host, "."):
		fqdn = host
	case len(labels) == 1:
		fqdn = host + "." + def.Namespace + ".svc." + domain + "."
	case len(labels) == 2:
		fqdn = host + ".svc." + domain + "."
	case labels[len(labels)-1] == "svc":
		fqdn = host + "." + domain + "."
	default:
		fqdn = host + "."
	}
	// Before lowercasing, which would turn the Kelvin sign (U+212A) into 'k'
	// and let a name that is not the one written through.
	if i := strings.IndexFunc(fqdn, func(r rune) bool { return r >= utf8.RuneSelf }); i >= 0 {
		r, _ := utf8.DecodeRuneInString(fqdn[i:])
		return fail("%q is not a valid DNS name: %q is not ASCII (write internationalized names in their xn-- form)", fqdn, r)
	}
	fqdn = strings.ToLower(fqdn)
	if err := checkName(fqdn); err != nil {
		return fail("%v", err)
	}
	s.FQDN = fqdn
	if s.SRV() {
		// _name._tcp. adds up to 21 bytes: the SRV name must fit the limit too.
		if err := checkName(s.QName()); err != nil {
			return fail("SRV name: %v", err)
		}
	}
	return s, nil
}

// checkName accepts absolute DNS names made of letters, digits, hyphens and
// underscores, each label 1–63 bytes, 253 bytes at most.
func checkName(fqdn string) error {
	for _, l := range strings.Split(strings.TrimSuffix(fqdn, "."), ".") {
		if l == "" || len(l) > 63 {
			return fmt.Errorf("%q is not a valid DNS name: label %q must be 1-63 characters", fqdn, l)
		}
		if l[0] == '-' || l[len(l)-1] == '-' {
			return fmt.Errorf("%q: label %q must not start or end with '-'", fqdn, l)
		}
		for _, c := range l {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("%q is not a valid DNS name: label %q has %q; use letters, digits and '-'", fqdn, l, c)
			}
		}
	}
	if len(fqdn) > 254 {
		return fmt.Errorf("name %q is longer than 253 characters", fqdn)
	}
	if _, ok := dns.IsDomainName(fqdn); !ok {
		return fmt.Errorf("%q is not a valid DNS name", fqdn)
	}
	return nil
}

// checkPortName applies Kubernetes' rule for named ports (IANA_SVC_NAME):
// 1–15 lowercase letters, digits and '-', at least one letter, no leading,
// trailing or doubled '-'.
func checkPortName(p string) error {
	if len(p) > 15 {
		return fmt.Errorf("longer than 15 characters")
	}
	letter := false
	for i, c := range p {
		switch {
		case c >= 'a' && c <= 'z':
			letter = true
		case c >= '0' && c <= '9':
		case c == '-':
			if i == 0 || i == len(p)-1 || p[i-1] == '-' {
				return fmt.Errorf("'-' may not lead, trail or repeat")
			}
		default:
			return fmt.Errorf("%q is not allowed; use lowercase letters, digits and '-'", c)
		}
	}
	if !letter {
		return fmt.Errorf("needs at least one letter")
	}
	return nil
}

// Environment is where pod-level defaults are read from; the zero value means
// the real paths.
type Environment struct {
	ResolvConf    string // default /etc/resolv.conf
	NamespaceFile string // default /var/run/secrets/kubernetes.io/serviceaccount/namespace
	// Getenv reads KUBERNETES_SERVICE_HOST and _PORT; default os.Getenv.
	Getenv func(string) string
}

// Detected holds the defaults found in a pod's environment.
type Detected struct {
	Defaults
	// Resolvers are the nameservers of resolv.conf as host:port.
	Resolvers []string
	// The defaults of `via api`: the apiserver as the pod sees it
	// (https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT, empty
	// outside a pod), and the service account's ca.crt and token next to
	// the namespace file (empty if missing).
	APIServer, APICAFile, APITokenFile string
}

// Detect reads the defaults a pod sees: the namespace from the service-account
// namespace file (else from a "<ns>.svc.<domain>" search entry, else "default"),
// the cluster domain from the "svc.<domain>" search entry (else "cluster.local"),
// and the resolvers from the nameserver lines (else 127.0.0.1:53).
func (e Environment) Detect() Detected {
	rc, nsFile := e.ResolvConf, e.NamespaceFile
	if rc == "" {
		rc = "/etc/resolv.conf"
	}
	if nsFile == "" {
		nsFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
	}
	var d Detected
	if cfg, err := dns.ClientConfigFromFile(rc); err == nil {
		port := cfg.Port
		if port == "" {
			port = "53"
		}
		for _, s := range cfg.Servers {
			d.Resolvers = append(d.Resolvers, joinHostPort(s, port))
		}
		for _, s := range cfg.Search {
			s = strings.Trim(strings.ToLower(s), ".")
			if dom, ok := strings.CutPrefix(s, "svc."); ok && d.ClusterDomain == "" {
				d.ClusterDomain = dom
			}
		}
		for _, s := range cfg.Search {
			s = strings.Trim(strings.ToLower(s), ".")
			if d.ClusterDomain != "" && d.Namespace == "" {
				if ns, ok := strings.CutSuffix(s, ".svc."+d.ClusterDomain); ok && !strings.Contains(ns, ".") {
					d.Namespace = ns
				}
			}
		}
	}
	if b, err := os.ReadFile(nsFile); err == nil && strings.TrimSpace(string(b)) != "" {
		d.Namespace = strings.TrimSpace(string(b))
	}
	getenv := e.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	if host, port := getenv("KUBERNETES_SERVICE_HOST"), getenv("KUBERNETES_SERVICE_PORT"); host != "" && port != "" {
		d.APIServer = "https://" + net.JoinHostPort(host, port)
	}
	saDir := filepath.Dir(nsFile)
	if f := filepath.Join(saDir, "ca.crt"); exists(f) {
		d.APICAFile = f
	}
	if f := filepath.Join(saDir, "token"); exists(f) {
		d.APITokenFile = f
	}
	if d.Namespace == "" {
		d.Namespace = "default"
	}
	if d.ClusterDomain == "" {
		d.ClusterDomain = "cluster.local"
	}
	if len(d.Resolvers) == 0 {
		d.Resolvers = []string{"127.0.0.1:53"}
	}
	return d
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }
