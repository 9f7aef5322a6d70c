package caddymodule

import (
	"fmt"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-headless/caddy-headless/discovery"
)

// Which candidates each lb_policy gets: a few for the policies that choose
// among what they are given, every endpoint for those that must see all.
func TestSamplerForPolicy(t *testing.T) {
	passive := &reverseproxy.HealthChecks{Passive: &reverseproxy.PassiveHealthChecks{FailDuration: caddy.Duration(1e9), MaxFails: 1}}
	handler := func(pol reverseproxy.Selector, hc *reverseproxy.HealthChecks) []caddy.Module {
		rp := &reverseproxy.Handler{HealthChecks: hc}
		if pol != nil {
			rp.LoadBalancing = &reverseproxy.LoadBalancing{SelectionPolicy: pol}
		}
		return []caddy.Module{rp, &reverseproxy.MultiUpstreams{}}
	}
	for _, tc := range []struct {
		name       string
		mods       []caddy.Module
		candidates int
		want       string
	}{
		{"default policy (random)", handler(nil, nil), 0, "random 2"},
		{"random", handler(&reverseproxy.RandomSelection{}, nil), 0, "random 2"},
		{"least_conn", handler(&reverseproxy.LeastConnSelection{}, nil), 0, "random 2"},
		{"random_choose 5", handler(&reverseproxy.RandomChoiceSelection{Choose: 5}, nil), 0, "random 5"},
		{"round_robin", handler(&reverseproxy.RoundRobinSelection{}, nil), 0, "window 2"},
		{"first", handler(&reverseproxy.FirstSelection{}, nil), 0, "first 2"},
		{"passive health", handler(&reverseproxy.LeastConnSelection{}, passive), 0, "random 8"},
		{"candidates 4", handler(&reverseproxy.RoundRobinSelection{}, passive), 4, "window 4"},
		{"candidates all", handler(&reverseproxy.RandomSelection{}, nil), -1, "all"},
		{"ip_hash", handler(&reverseproxy.IPHashSelection{}, nil), 0, "all"},
		{"cookie", handler(&reverseproxy.CookieHashSelection{}, nil), 0, "all"},
		{"weighted_round_robin", handler(&reverseproxy.WeightedRoundRobinSelection{}, nil), 0, "all"},
		{"not under reverse_proxy", nil, 0, "all"},
	} {
		got := "all"
		if s := samplerFor(tc.mods, tc.candidates); s != nil {
			got = fmt.Sprintf("%s %d", map[discovery.Pick]string{discovery.PickRandom: "random", discovery.PickWindow: "window", discovery.PickFirst: "first"}[s.Pick], s.Size)
		}
		if got != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
}

func TestCandidatesOption(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
		err  string
	}{
		{"candidates 4", 4, ""},
		{"candidates all", -1, ""},
		{"candidates 0", 0, `candidates takes a count (at least 1) or all, got "0"`},
		{"candidates many", 0, `got "many"`},
		{"candidates", 0, "wrong argument count"},
	} {
		var h Headless
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("headless app:80 {\n" + tc.in + "\n}"))
		switch {
		case tc.err == "" && (err != nil || h.Candidates != tc.want):
			t.Errorf("%q: candidates %d, %v; want %d", tc.in, h.Candidates, err, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: error %v, want one with %q", tc.in, err, tc.err)
		}
	}
}
