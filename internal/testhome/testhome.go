// Package testhome keeps the tests that run Caddy in their own process out of
// the user's home directory.
//
// Caddy computes where it autosaves the config and where its default storage
// lives (certificates, locks, last_clean.json) when its package is initialized,
// from $HOME or the XDG directories: setting the environment inside a test is
// too late. Main points HOME and the XDG directories at a temporary directory
// and computes both paths again, the way Caddy's own command does after loading
// an env file. CheckNoWrites proves it: it runs Caddy in a new process of the
// test binary with HOME set to an empty directory, which must stay empty.
package testhome

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Main runs the package's tests with HOME, XDG_CONFIG_HOME, XDG_DATA_HOME and
// XDG_CACHE_HOME in a temporary directory, removed afterwards. Call it from
// TestMain: func TestMain(m *testing.M) { testhome.Main(m) }.
func Main(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "caddy-headless-test-home-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "testhome:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	for name, sub := range map[string]string{
		"HOME":            "home",
		"XDG_CONFIG_HOME": "config",
		"XDG_DATA_HOME":   "data",
		"XDG_CACHE_HOME":  "cache",
	} {
		if err := os.Setenv(name, filepath.Join(dir, sub)); err != nil {
			fmt.Fprintln(os.Stderr, "testhome:", err)
			return 1
		}
	}
	caddy.ConfigAutosavePath = filepath.Join(caddy.AppConfigDir(), "autosave.json")
	caddy.DefaultStorage.Path = caddy.AppDataDir()
	return m.Run()
}

// CheckNoWrites runs the calling test again in a new process of this test
// binary, with HOME set to a new empty directory and the XDG variables unset.
// There it starts Caddy with the defaults that write state (config autosave,
// the tls app's storage cleaning in the default storage) and waits for both
// files; the test fails if anything was written into that HOME. Call it from a
// test of its own in every package whose TestMain is Main.
func CheckNoWrites(t *testing.T) {
	if os.Getenv(childEnv) == "1" {
		writeState(t)
		return
	}
	home := t.TempDir()
	args := []string{"-test.count=1", "-test.run=^" + t.Name() + "$"}
	if d, ok := t.Deadline(); ok {
		args = append(args, "-test.timeout="+time.Until(d).Round(time.Second).String())
	}
	cmd := exec.CommandContext(t.Context(), os.Args[0], args...)
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case "HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME":
		default:
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "HOME="+home, childEnv+"=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s, run again with HOME=%s: %v\n%s", t.Name(), home, err, out)
	}
	var written []string
	err := filepath.WalkDir(home, func(path string, _ fs.DirEntry, err error) error {
		if err == nil && path != home {
			rel, _ := filepath.Rel(home, path)
			written = append(written, rel)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(written) > 0 {
		t.Errorf("Caddy in this package's tests writes into $HOME (%s): %s; TestMain must be testhome.Main",
			home, strings.Join(written, ", "))
	}
}

const childEnv = "CADDY_HEADLESS_TESTHOME_CHILD"

// writeState runs Caddy until it has written its autosaved config and the
// storage cleaning record, wherever the paths point.
func writeState(t *testing.T) {
	if err := caddy.Load([]byte(`{"admin":{"disabled":true},"apps":{"tls":{}}}`), true); err != nil {
		t.Fatal(err)
	}
	defer caddy.Stop()
	files := []string{caddy.ConfigAutosavePath, filepath.Join(caddy.DefaultStorage.Path, "last_clean.json")}
	for _, f := range files {
		for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
			if _, err := os.Stat(f); err == nil {
				break
			}
			if time.Since(start) > 30*time.Second {
				t.Fatalf("Caddy did not write %s (the check would prove nothing)", f)
			}
		}
	}
}
