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
		"127.0.6.x:8080", "listening on 127.0.6.1:", "shares the same 2 cores, so absolute numbers are low and noisy (the throughput drill's A/A", "in its section below).\n\n| headline |\n\n## 1. first\n\n## 2. second\n\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "<no value>") || strings.Contains(out, "%!") {
		t.Errorf("unfilled field:\n%s", out)
	}
}

// A run of some drills replaces their sections and summary rows, adds the new
// ones, and keeps the rest of the report.
func TestMergeReport(t *testing.T) {
	old := "# B\n\nintro\n\n## Summary\n\ntext\n\n|  | a | b |\n|---|---|---|\n| one | 1 | 1 |\n| two | 2 | 2 |\n\n" +
		"## 1. first\n\nold first\n\n## 2. second\n\nold second\n\n## Storage: x\n\nkept\n"
	fresh := "# B\n\nnew intro\n\n## Summary\n\ntext\n\n|  | a | b |\n|---|---|---|\n| two | 20 | 20 |\n| three | 3 | 3 |\n\n" +
		"## 2. second\n\nnew second\n\n## 9. ninth\n\nnew ninth\n\n"
	got := mergeReport(old, fresh, []*section{{title: "2. second"}, {title: "9. ninth"}}, "_stamp_")
	want := "# B\n\nintro\n\n## Summary\n\ntext\n\n|  | a | b |\n|---|---|---|\n| one | 1 | 1 |\n| two | 20 | 20 |\n| three | 3 | 3 |\n\n" +
		"## 1. first\n\nold first\n\n## 2. second\n\nnew second\n\n_stamp_\n\n## 9. ninth\n\nnew ninth\n\n_stamp_\n\n## Storage: x\n\nkept\n"
	if got != want {
		t.Errorf("merged:\n%s\nwant:\n%s", got, want)
	}
}

// A whole run rewrites the drills and keeps the sections measured by tests,
// after the numbered ones.
func TestNotFromBench(t *testing.T) {
	report := "# B\n\n## Summary\n\nx\n\n## 1. first\n\na\n\n## 9. ninth\n\nb\n\n## `via api` on kube-apiserver\n\nc\n\n## Storage: x\n\nd\n"
	i := notFromBench(report)
	if i < 0 || report[i:] != "## `via api` on kube-apiserver\n\nc\n\n## Storage: x\n\nd\n" {
		t.Fatalf("notFromBench = %d (%q)", i, report[max(i, 0):])
	}
	if i := notFromBench("# B\n\n## Summary\n\n## 1. a\n"); i != -1 {
		t.Fatalf("a report of drills only: %d, want -1", i)
	}
}
