package main

import (
	"strings"
	"testing"
	"time"
)

// The template renders every field it is given, and the drills' sections in order.
func TestRenderReport(t *testing.T) {
	i := reportInfo{Cmd: "bin/bench -drills path", Date: "2026-01-02 03:04 UTC", Took: 13 * time.Minute, Cores: 2, CPU: "Xeon",
		Kernel: "6.1", Go: "go1.26", Caddy: "v2.11.9", Source: "commit x", Nginx: "nginx/1", HAProxy: "HAProxy 3", Wrk: "wrk 4",
		TTL: 5, DNS: "127.0.6.1:53", EpPort: "8080", Host: "127.0.6.1", Headline: "| headline |\n", Sections: []string{"## 1. first\n", "## 2. second\n"}}
	out := renderReport(i)
	for _, want := range []string{"`bin/bench -drills path`", "Run on 2026-01-02 03:04 UTC; the whole run took 13m0s.",
		"| CPU | 2 cores (Xeon) |", "| Caddy | v2.11.9 with this plugin, built from commit x", "TTL 5 s) runs inside the harness at 127.0.6.1:53",
		"127.0.6.x:8080", "listening on 127.0.6.1:", "a few % between runs", "in its section below).\n\n| headline |\n\n## 1. first\n\n## 2. second\n\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "<no value>") || strings.Contains(out, "%!") {
		t.Errorf("unfilled field:\n%s", out)
	}
}
