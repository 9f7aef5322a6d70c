package main

import (
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestWatchZoneSeesEdits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cluster.zone")
	first := []byte("a.bbs.svc.cluster.local. 5 IN A 127.0.0.57\n")
	if err := os.WriteFile(path, first, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changes := make(chan string, 4)
	done := make(chan struct{})
	go func() {
		watchZone(ctx, path, first, time.Millisecond, func(b []byte) { changes <- string(b) })
		close(done)
	}()

	// An editor that writes a new file and renames it over the old one.
	second := "a.bbs.svc.cluster.local. 5 IN A 127.0.0.58\n"
	tmp := path + ".swp"
	if err := os.WriteFile(tmp, []byte(second), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	if got := <-changes; got != second {
		t.Fatalf("changed(%q), want %q", got, second)
	}
	cancel()
	<-done
	select {
	case got := <-changes:
		t.Fatalf("unchanged file reported again: %q", got)
	default:
	}
}

func TestSummary(t *testing.T) {
	got := summary("; comment\n\nb. 5 IN A 127.0.0.2\na.   5  IN A 127.0.0.1\n")
	if want := "    a. 5 IN A 127.0.0.1\n    b. 5 IN A 127.0.0.2"; got != want {
		t.Fatalf("summary = %q, want %q", got, want)
	}
	if got := summary("; nothing\n"); !strings.Contains(got, "NXDOMAIN") {
		t.Fatalf("empty zone summary = %q", got)
	}
}

func TestWhoamiSaysWhoItIs(t *testing.T) {
	rec := httptest.NewRecorder()
	req := httptest.NewRequest("GET", "https://bbs.test.com/api/items?x=1", nil)
	req.Header.Set("X-Real-IP", "127.0.0.1")
	whoami("backend", "127.0.0.27:8004").ServeHTTP(rec, req)
	want := "backend at 127.0.0.27:8004: GET /api/items?x=1 (Host bbs.test.com, X-Real-IP 127.0.0.1, X-Forwarded-For -, X-Forwarded-Proto -)\n"
	if got := rec.Body.String(); got != want {
		t.Fatalf("body = %q, want %q", got, want)
	}
}
