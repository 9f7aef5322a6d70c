package kubeapi

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestTokenIsReadAgainWhenOld: a token older than TokenMaxAge is read
// from the file again before it is used, without waiting for a 401 (bound
// service-account tokens rotate; an apiserver may keep accepting the old
// one for a while, then refuse it mid-operation).
func TestTokenIsReadAgainWhenOld(t *testing.T) {
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte("old\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ts := &TokenSource{File: file}
	if v, err := ts.Get(false); err != nil || v != "old" {
		t.Fatalf("first read = %q, %v", v, err)
	}
	if err := os.WriteFile(file, []byte("new\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if v, _ := ts.Get(false); v != "old" {
		t.Fatalf("a fresh token was read again (%q): want it cached for %v", v, TokenMaxAge)
	}
	ts.mu.Lock()
	ts.readAt = ts.readAt.Add(-TokenMaxAge - time.Second) // as if read a while ago
	ts.mu.Unlock()
	if v, err := ts.Get(false); err != nil || v != "new" {
		t.Fatalf("token read %v ago = %q, %v; want the file's new token", TokenMaxAge, v, err)
	}
}
