package main

import (
	"testing"
	"time"
)

func TestParseWrk(t *testing.T) {
	out := `Running 4s test @ http://127.0.6.1:18100/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.01ms   10.32ms 120.50ms   80.10%
    Req/Sec     2.71k   412.33     3.50k    70.00%
  Latency Distribution
     50%    9.70ms
     75%   14.20ms
     90%   22.00ms
     99%    1.05s
  21640 requests in 4.01s, 3.12MB read
  Non-2xx or 3xx responses: 3
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:   5396.51
Transfer/sec:    797.37KB
`
	r, err := parseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	want := wrkResult{rps: 5396.51, p50: 9700 * time.Microsecond, p99: 1050 * time.Millisecond, requests: 21640, errors: 6}
	if r != want {
		t.Fatalf("parseWrk = %+v, want %+v", r, want)
	}
	if _, err := parseWrk("unable to connect"); err == nil {
		t.Fatal("parseWrk of an error message: no error")
	}
}

func TestQuantile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 100; i++ {
		d = append(d, time.Duration(i))
	}
	for q, want := range map[float64]time.Duration{0.5: 50, 0.99: 99, 1: 100} {
		if got := quantile(d, q); got != want {
			t.Errorf("quantile(1..100, %v) = %v, want %v", q, got, want)
		}
	}
	if quantile(nil, 0.5) != 0 {
		t.Error("quantile of nothing is not 0")
	}
}
