package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// --- open-loop Go client -----------------------------------------------------------

// sample is one request: when it started (since the load began), how long it
// took, and how it ended.
type sample struct {
	at, took time.Duration
	status   int    // 0: transport error
	err      string // status text or transport error
}

func (s sample) ok() bool { return s.status == 200 }

// load sends GET requests at a fixed rate whatever the answers take (open
// loop, so a stalled proxy shows as latency rather than as fewer requests).
type load struct {
	client  *http.Client
	start   time.Time
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	mu      sync.Mutex
	samples []sample
	dropped int // not sent: too many requests in flight
}

// startLoad sends rate requests/s to the URLs in turn until stopped.
func startLoad(urls []string, rate int) *load {
	ctx, cancel := context.WithCancel(context.Background())
	client := &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			MaxIdleConns: 4096, MaxIdleConnsPerHost: 4096, IdleConnTimeout: 90 * time.Second,
			DisableCompression: true,
		},
	}
	l := &load{client: client, start: time.Now(), cancel: cancel}
	slots := make(chan struct{}, 8192)
	interval := time.Second / time.Duration(rate)
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		next := time.Now()
		for i := 0; ; i++ {
			next = next.Add(interval)
			if d := time.Until(next); d > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(d):
				}
			} else if ctx.Err() != nil {
				return
			}
			select {
			case slots <- struct{}{}:
			default:
				l.mu.Lock()
				l.dropped++
				l.mu.Unlock()
				continue
			}
			url := urls[i%len(urls)]
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				defer func() { <-slots }()
				t0 := time.Now()
				s := sample{at: t0.Sub(l.start)}
				resp, err := client.Get(url)
				if err != nil {
					s.err = err.Error()
				} else {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					s.status = resp.StatusCode
					if resp.StatusCode != 200 {
						s.err = resp.Status
					}
				}
				s.took = time.Since(t0)
				l.mu.Lock()
				l.samples = append(l.samples, s)
				l.mu.Unlock()
			}()
		}
	}()
	return l
}

// elapsed is the time since the load started.
func (l *load) elapsed() time.Duration { return time.Since(l.start) }

// stop stops sending, waits for the requests in flight and closes the
// client's kept-alive connections.
func (l *load) stop() []sample {
	l.cancel()
	l.wg.Wait()
	l.client.CloseIdleConnections()
	l.mu.Lock()
	defer l.mu.Unlock()
	sort.Slice(l.samples, func(i, j int) bool { return l.samples[i].at < l.samples[j].at })
	return l.samples
}

// window is the samples that started in [from, to).
func window(ss []sample, from, to time.Duration) []sample {
	var out []sample
	for _, s := range ss {
		if s.at >= from && s.at < to {
			out = append(out, s)
		}
	}
	return out
}

// summary of a set of samples.
type summary struct {
	n, errors     int
	httpErrors    int // answers other than 200; the rest of errors are transport errors
	p50, p99, max time.Duration
	kinds         map[string]int
}

func summarize(ss []sample) summary {
	sm := summary{n: len(ss), kinds: map[string]int{}}
	var lat []time.Duration
	for _, s := range ss {
		lat = append(lat, s.took)
		if !s.ok() {
			sm.errors++
			if s.status != 0 {
				sm.httpErrors++
			}
			sm.kinds[errKind(s.err)]++
		}
	}
	sm.p50, sm.p99, sm.max = quantile(lat, 0.5), quantile(lat, 0.99), quantile(lat, 1)
	return sm
}

// errKind shortens an error to its kind: "502 Bad Gateway", "connection reset", …
func errKind(e string) string {
	for _, k := range []string{"connection refused", "connection reset", "EOF", "timeout", "Client.Timeout"} {
		if strings.Contains(e, k) {
			return k
		}
	}
	if len(e) > 40 {
		e = e[:40]
	}
	return e
}

func (sm summary) kindList() string {
	if sm.errors == 0 {
		return "—"
	}
	var parts []string
	for _, k := range sortedKeys(sm.kinds) {
		parts = append(parts, fmt.Sprintf("%d × %s", sm.kinds[k], k))
	}
	return strings.Join(parts, ", ")
}

func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(q*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// --- wrk -------------------------------------------------------------------------

// wrkResult is what wrk reports.
type wrkResult struct {
	rps      float64
	p50, p99 time.Duration
	requests int
	errors   int // non-2xx/3xx plus socket errors
}

const (
	wrkThreads = 2
	wrkConns   = 64
)

func runWrk(ctx context.Context, url string, d time.Duration) (wrkResult, error) {
	args := []string{fmt.Sprintf("-t%d", wrkThreads), fmt.Sprintf("-c%d", wrkConns),
		fmt.Sprintf("-d%ds", int(d.Seconds())), "--latency", "--timeout", "10s", url}
	out, err := exec.CommandContext(ctx, "wrk", args...).CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return parseWrk(string(out))
}

var (
	reRPS      = regexp.MustCompile(`Requests/sec:\s+([\d.]+)`)
	reLat      = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$`)
	reRequests = regexp.MustCompile(`(\d+) requests in`)
	reNon2xx   = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	reSocket   = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
)

func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	m := reRPS.FindStringSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("wrk: no Requests/sec in %q", out)
	}
	r.rps, _ = strconv.ParseFloat(m[1], 64)
	for _, m := range reLat.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(m[2], 64)
		unit := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second, "m": time.Minute}[m[3]]
		d := time.Duration(v * float64(unit))
		if m[1] == "50" {
			r.p50 = d
		} else {
			r.p99 = d
		}
	}
	if m := reRequests.FindStringSubmatch(out); m != nil {
		r.requests, _ = strconv.Atoi(m[1])
	}
	if m := reNon2xx.FindStringSubmatch(out); m != nil {
		n, _ := strconv.Atoi(m[1])
		r.errors += n
	}
	if m := reSocket.FindStringSubmatch(out); m != nil {
		for _, s := range m[1:] {
			n, _ := strconv.Atoi(s)
			r.errors += n
		}
	}
	return r, nil
}
