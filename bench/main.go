// Command bench runs caddy-headless's benchmarks and failure drills side by
// side with its peers, on loopback, and writes BENCHMARKS.md (`make bench`,
// which builds it as bin/bench and runs it in the checkout's root):
//
//	bin/bench -caddy bin/caddy -out BENCHMARKS.md [-drills throughput,stall] [-quick]
//
// With -drills naming some drills and -out an existing report, only their
// sections and summary rows are replaced (or added); the rest is kept.
//
// It is a module of its own (go.mod beside this file, the plugin by a
// replace), so its tools never reach the plugin's go.mod.
//
// Everything runs on 127.0.6.0/24: the cluster DNS stand-in (package dnstest,
// in this process, so a drill can stall it or change its records at an exact
// moment), the endpoints (HTTP servers in this process that count what they
// serve), and the proxies as child processes with generated configurations:
// Caddy with `headless_proxy`, with static upstreams and with `dynamic a`
// (all from the same bin/caddy), nginx and HAProxy. Throughput load comes from
// wrk; the drills that must attribute each request (latency during a stall,
// errors during churn) use an open-loop Go client at a fixed rate.
//
// Each drill prints what it measured; none of them passes or fails.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// drill is one section of BENCHMARKS.md.
type drill struct {
	key, title string
	run        func(ctx context.Context, h *harness) (*section, error)
}

var drills = []drill{
	{"path", "1. Request path: GetUpstreams", drillPath},
	{"throughput", "2. Throughput", drillThroughput},
	{"stall", "3. DNS stall", drillStall},
	{"convergence", "4. Convergence", drillConvergence},
	{"churn", "5. Churn", drillChurn},
	{"big", "6. Big service: 1,000 endpoints", drillBig},
	{"many", "7. Many services: 500", drillMany},
	{"reload", "8. Reload storm", drillReload},
	{"abrupt", "9. Abrupt churn", drillAbrupt},
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("bench: ")
	caddyBin := flag.String("caddy", "bin/caddy", "Caddy built with this plugin (make build)")
	out := flag.String("out", "BENCHMARKS.md", "report to write (\"\" for stdout only)")
	only := flag.String("drills", "all", "comma-separated drills: "+drillKeys())
	quick := flag.Bool("quick", false, "short runs, to try the harness (numbers are not comparable)")
	source := flag.String("source", "", "what -caddy was built from, for the report (default: this checkout's commit, and whether it had uncommitted changes)")
	flag.Parse()

	want := map[string]bool{}
	for _, k := range strings.Split(*only, ",") {
		want[strings.TrimSpace(k)] = true
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	h, err := newHarness(*caddyBin, *quick)
	if err != nil {
		log.Fatal(err)
	}
	h.source = *source
	if h.source == "" {
		h.source = "this checkout at " + versionOf("git", "describe", "--always", "--dirty")
	}
	defer h.close()

	started := time.Now()
	var sections []*section
	for _, d := range drills {
		if !want["all"] && !want[d.key] {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		log.Printf("drill %s", d.title)
		t0, load0 := time.Now(), loadAvg()
		sec, err := d.run(ctx, h)
		h.stopAll()
		if err != nil {
			log.Printf("drill %s: %v", d.key, err)
			sec = &section{notes: []string{"**Did not complete:** " + err.Error()}}
		}
		sec.title = d.title
		sec.elapsed = time.Since(t0)
		sec.load = load0 + " → " + loadAvg()
		fmt.Println(sec.markdown())
		sections = append(sections, sec)
	}
	if ctx.Err() != nil {
		h.close()
		log.Fatal("interrupted; nothing written")
	}
	fmt.Println("## Summary\n\n" + h.headlineTable())
	report := h.report(sections, time.Since(started), os.Args[1:])
	if old, err := os.ReadFile(*out); err == nil && *out != "" && !want["all"] {
		// Some drills only: their sections and summary rows replace those
		// of the report already there, the rest of it stays.
		stamp := fmt.Sprintf("_This section and its summary rows are from a separate run: `%s`, %s, Caddy built from %s; the rest of this file is from the run named at the top._",
			commandLine(os.Args[1:]), time.Now().UTC().Format("2006-01-02 15:04 UTC"), h.source)
		report = mergeReport(string(old), report, sections, stamp)
		log.Printf("merged the sections of %s into %s", *only, *out)
	}
	if old, err := os.ReadFile(*out); err == nil && *out != "" && want["all"] {
		// A whole run rewrites the drills; the sections measured by tests stay.
		if i := notFromBench(string(old)); i >= 0 {
			report = strings.TrimRight(report, "\n") + "\n\n" + string(old[i:])
		}
	}
	if *out != "" {
		if err := os.WriteFile(*out, []byte(report), 0o644); err != nil {
			log.Fatal(err)
		}
		log.Printf("wrote %s in %s", *out, time.Since(started).Round(time.Second))
	}
}

func drillKeys() string {
	var keys []string
	for _, d := range drills {
		keys = append(keys, d.key)
	}
	return strings.Join(keys, ",")
}

// loadAvg is the machine's 1-minute load average, as /proc/loadavg has it.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	if f := strings.Fields(string(b)); len(f) > 0 {
		return f[0]
	}
	return "?"
}
