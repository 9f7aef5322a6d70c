// Command standin plays the cluster for `make demo`, on loopback:
//
//	standin dns     -listen 127.0.0.1:10053 -zone demo/run/cluster.zone
//	standin backend -listen 127.0.0.57:8001 -name frontend
//
// "dns" answers like CoreDNS's kubernetes plugin (package dnstest) from a
// zone file that can be edited while it runs: each saved change is served
// within a quarter of a second, as an EndpointSlice change is in a cluster.
// A file that does not parse is reported and the previous records are kept.
//
// "backend" is an HTTP server that answers with who it is (its name and
// address), the request it got and the forwarding headers Caddy set.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

func main() {
	log.SetFlags(0)
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "dns":
		err = runDNS(ctx, os.Args[2:])
	case "backend":
		err = runBackend(ctx, os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		log.Fatalf("standin %s: %v", os.Args[1], err)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: standin dns -listen ADDR -zone FILE | standin backend -listen ADDR -name NAME")
	os.Exit(2)
}

func runDNS(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("dns", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:10053", "UDP and TCP address to answer on")
	zone := fs.String("zone", "demo/run/cluster.zone", "zone file to serve, re-read when it changes")
	fs.Parse(args)

	text, err := os.ReadFile(*zone)
	if err != nil {
		return err
	}
	srv, err := dnstest.Listen(*listen, string(text))
	if err != nil {
		return fmt.Errorf("%s: %w", *zone, err)
	}
	defer srv.Close()
	log.Printf("dns: answering on %s from %s:\n%s", srv.Addr, *zone, summary(string(text)))
	watchZone(ctx, *zone, text, 250*time.Millisecond, func(text []byte) {
		if err := srv.Set(string(text)); err != nil {
			log.Printf("dns: %s: %v; still serving the previous records", *zone, err)
			return
		}
		log.Printf("dns: %s changed, now serving:\n%s", *zone, summary(string(text)))
	})
	return nil
}

// watchZone calls changed with the file's contents each time they differ from
// the last seen, checking every interval until ctx ends. It compares contents,
// not modification times, so editors that replace the file are noticed too.
func watchZone(ctx context.Context, path string, last []byte, interval time.Duration, changed func([]byte)) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		text, err := os.ReadFile(path)
		if err != nil || bytes.Equal(text, last) {
			continue // a missing file mid-save: wait for the next one
		}
		last = text
		changed(text)
	}
}

// summary lists the zone's records, one per line, without comments.
func summary(zone string) string {
	var lines []string
	for _, l := range strings.Split(zone, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, ";") {
			lines = append(lines, "    "+strings.Join(strings.Fields(l), " "))
		}
	}
	sort.Strings(lines)
	if len(lines) == 0 {
		return "    (no records: every name answers NXDOMAIN)"
	}
	return strings.Join(lines, "\n")
}

func runBackend(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("backend", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.57:8001", "address to serve HTTP on")
	name := fs.String("name", "frontend", "the Service this endpoint belongs to")
	fs.Parse(args)

	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: whoami(*name, l.Addr().String()), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(l); err != http.ErrServerClosed {
		return err
	}
	return nil
}

// whoami answers with the endpoint's name and address, the request line and
// the headers a proxy is expected to set, and logs the same line.
func whoami(name, addr string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		line := fmt.Sprintf("%s at %s: %s %s (Host %s, X-Real-IP %s, X-Forwarded-For %s, X-Forwarded-Proto %s)",
			name, addr, r.Method, r.URL.RequestURI(), r.Host,
			orNone(r.Header.Get("X-Real-IP")), orNone(r.Header.Get("X-Forwarded-For")), orNone(r.Header.Get("X-Forwarded-Proto")))
		log.Print(line)
		fmt.Fprintln(w, line)
	})
}

func orNone(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
