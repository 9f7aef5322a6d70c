package discovery

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Kubernetes refuses loopback and link-local endpoint addresses, so cluster
// DNS never hands them out. An answer that has them comes from a name outside
// the cluster, an ExternalName CNAME, or a poisoned resolver, and would turn
// the proxy against itself: Caddy's admin API listens on localhost, cloud
// metadata on 169.254.169.254. The AddressPolicy drops such endpoints unless
// the configuration allows them by name.

// AddressPolicy decides which endpoint addresses from DNS are used. The zero
// value takes every address except loopback and link-local ones.
type AddressPolicy struct {
	// Loopback allows 127.0.0.0/8 and ::1.
	Loopback bool
	// LinkLocal allows 169.254.0.0/16 (cloud metadata lives there) and fe80::/10.
	LinkLocal bool
	// CIDRs, if any, are the only ranges endpoints are taken from. A loopback
	// or link-local address is taken only from a range that lies inside
	// loopback or link-local (it is allowed by name), not from one that
	// merely contains it, such as 0.0.0.0/0.
	CIDRs []netip.Prefix
}

// The reasons an address is refused, as logs and metrics name them. The
// first five hold whatever the AddressPolicy: nothing can be dialed there.
const (
	RefusedPort0       = "port_0"      // an SRV record with port 0
	RefusedUnspecified = "unspecified" // 0.0.0.0/8 ("this network") and ::
	RefusedMulticast   = "multicast"
	RefusedReserved    = "reserved"    // 240.0.0.0/4, with the broadcast address 255.255.255.255
	RefusedIPv4Mapped  = "ipv4_mapped" // ::ffff:0:0/96 in AAAA: not an IPv6 endpoint, and a way around the IPv4 rules
	RefusedLoopback    = "loopback"
	RefusedLinkLocal   = "link_local"
	RefusedOutside     = "outside_allow_cidrs"
)

// unusable returns why e can never be an endpoint, or "" if it can.
func unusable(e Endpoint) string {
	ip := e.IP
	switch {
	case e.Port == 0:
		return RefusedPort0
	case ip.Is4In6():
		return RefusedIPv4Mapped
	case ip.IsUnspecified() || ip.Is4() && ip.As4()[0] == 0:
		return RefusedUnspecified
	case ip.IsMulticast():
		return RefusedMulticast
	case ip.Is4() && ip.As4()[0] >= 240:
		return RefusedReserved
	}
	return ""
}

// RefusedEndpoint is an endpoint DNS named that the policy did not allow.
type RefusedEndpoint struct {
	Endpoint Endpoint
	// Name is the DNS name the address was given for: the SRV target, or the
	// Service's name for A/AAAA records.
	Name   string
	Reason string
}

func (r RefusedEndpoint) String() string {
	return fmt.Sprintf("%s -> %s (%s)", strings.TrimSuffix(r.Name, "."), r.Endpoint.Dial, r.Reason)
}

// maxRefusedListed bounds the refused endpoints a Result lists for the log.
const maxRefusedListed = 20

// Loopback and link-local ranges: a range of allow_cidrs allows such an
// address only if it lies inside one of these (say 127.0.0.0/8 or
// 169.254.169.254/32). 0.0.0.0/0 merely contains them: it means "anywhere"
// and must not open the admin port or cloud metadata by accident.
var (
	loopbackRanges  = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	linkLocalRanges = []netip.Prefix{netip.MustParsePrefix("169.254.0.0/16"), netip.MustParsePrefix("fe80::/10")}
)

// refuses returns why p does not allow ip, or "" if it does.
func (p AddressPolicy) refuses(ip netip.Addr) string {
	ip = ip.Unmap()
	kind, ranges := "", []netip.Prefix(nil)
	switch {
	case ip.IsLoopback():
		if p.Loopback {
			return ""
		}
		kind, ranges = RefusedLoopback, loopbackRanges
	case ip.IsLinkLocalUnicast():
		if p.LinkLocal {
			return ""
		}
		kind, ranges = RefusedLinkLocal, linkLocalRanges
	}
	if len(p.CIDRs) == 0 {
		return kind
	}
	contained := false
	for _, c := range p.CIDRs {
		if !c.Contains(ip) {
			continue
		}
		if kind == "" || slices.ContainsFunc(ranges, func(r netip.Prefix) bool { return c.Bits() >= r.Bits() && r.Contains(c.Addr()) }) {
			return ""
		}
		contained = true
	}
	if contained {
		return kind
	}
	return RefusedOutside
}

// admit returns the endpoints of eps that can be dialed and that p allows
// (p nil: every usable one), listing the others in res.Refused. It runs
// before the cut to MaxEndpoints.
func (res *Result) admit(svc Service, eps []Endpoint, p *AddressPolicy) []Endpoint {
	kept := eps[:0]
	for _, e := range eps {
		why := unusable(e)
		if why == "" && p != nil {
			why = p.refuses(e.IP)
		}
		if why == "" {
			kept = append(kept, e)
			continue
		}
		res.refuse(svc, e, why)
	}
	return kept
}

// refuse counts one refused endpoint and lists the first maxRefusedListed.
func (res *Result) refuse(svc Service, e Endpoint, why string) {
	res.RefusedCount++
	if len(res.Refused) >= maxRefusedListed {
		return
	}
	name := e.Target
	if name == "" {
		name = svc.FQDN
	}
	if e.Dial == "" {
		host := "(any address)"
		if e.IP.IsValid() {
			host = e.IP.String()
		}
		e.Dial = net.JoinHostPort(host, strconv.Itoa(int(e.Port)))
	}
	res.Refused = append(res.Refused, RefusedEndpoint{Endpoint: e, Name: name, Reason: why})
}

// hint says how to allow what was refused, for errors and logs.
func (p AddressPolicy) hint() string { return hintFor("") }

// hintFor says why an address refused for reason is, and how to allow it if it can be.
func hintFor(reason string) string {
	switch reason {
	case RefusedPort0, RefusedUnspecified, RefusedMulticast, RefusedReserved, RefusedIPv4Mapped:
		return "port 0, 0.0.0.0/8, ::, multicast, 240.0.0.0/4 (with broadcast) and IPv4-mapped IPv6 addresses are never endpoints; fix the records"
	}
	return "DNS may not point requests at loopback or link-local addresses, nor outside allow_cidrs; " +
		"if these endpoints are meant, allow them (allow_addresses loopback link_local, or allow_cidrs with a range inside 127.0.0.0/8 or 169.254.0.0/16: " +
		"a wider one such as 0.0.0.0/0 does not allow them)"
}

// key describes p for Config.Key.
func (p AddressPolicy) key() string {
	cidrs := make([]string, len(p.CIDRs))
	for i, c := range p.CIDRs {
		cidrs[i] = c.Masked().String()
	}
	slices.Sort(cidrs)
	return fmt.Sprintf("loopback=%t linklocal=%t cidrs=%s", p.Loopback, p.LinkLocal, strings.Join(cidrs, ","))
}
