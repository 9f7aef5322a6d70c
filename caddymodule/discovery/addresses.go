package discovery

import (
	"fmt"
	"net/netip"
	"slices"
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
	// CIDRs, if any, are the only ranges endpoints are taken from; an address
	// in one of them is taken whatever its kind, as it is allowed by name.
	CIDRs []netip.Prefix
}

// The reasons an AddressPolicy refuses an address, as logs and metrics name them.
const (
	RefusedLoopback  = "loopback"
	RefusedLinkLocal = "link_local"
	RefusedOutside   = "outside_allow_cidrs"
)

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

// refuses returns why p does not allow ip, or "" if it does.
func (p AddressPolicy) refuses(ip netip.Addr) string {
	ip = ip.Unmap()
	if len(p.CIDRs) > 0 {
		if slices.ContainsFunc(p.CIDRs, func(c netip.Prefix) bool { return c.Contains(ip) }) {
			return ""
		}
		if !(p.Loopback && ip.IsLoopback() || p.LinkLocal && ip.IsLinkLocalUnicast()) {
			return RefusedOutside
		}
		return ""
	}
	switch {
	case ip.IsLoopback() && !p.Loopback:
		return RefusedLoopback
	case ip.IsLinkLocalUnicast() && !p.LinkLocal:
		return RefusedLinkLocal
	}
	return ""
}

// apply removes from res the endpoints p refuses, listing them in
// res.Refused. When it refuses every endpoint of an answer that had some, the
// answer is not "no ready endpoints" but one that must not be followed: the
// error (bad_answer) keeps the last good set.
func (p AddressPolicy) apply(svc Service, res *Result) error {
	kept := res.Endpoints[:0:0]
	for _, e := range res.Endpoints {
		why := p.refuses(e.IP)
		if why == "" {
			kept = append(kept, e)
			continue
		}
		res.RefusedCount++
		if len(res.Refused) < maxRefusedListed {
			name := e.Target
			if name == "" {
				name = svc.FQDN
			}
			res.Refused = append(res.Refused, RefusedEndpoint{Endpoint: e, Name: name, Reason: why})
		}
	}
	if res.RefusedCount == 0 {
		return nil
	}
	res.Endpoints = slices.Clip(kept)
	if len(kept) > 0 {
		return nil
	}
	return &LookupError{Name: svc.QName(), Type: svc.qtype(), Server: res.Server, Outcome: OutcomeBadAnswer,
		Err: fmt.Errorf("every address in the answer is refused (%s): %s", res.Refused[0], p.hint())}
}

// hint says how to allow what was refused, for errors and logs.
func (p AddressPolicy) hint() string {
	return "DNS may not point requests at loopback or link-local addresses, nor outside allow_cidrs; " +
		"if these endpoints are meant, allow them (allow_addresses loopback link_local, or allow_cidrs)"
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
