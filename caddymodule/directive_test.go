package caddymodule

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile" // the caddyfile adapter
	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/requestbody"
)

var updateGolden = flag.Bool("update-golden", false, "rewrite the golden files under testdata/ with the current output")

// adaptCaddyfile runs the Caddyfile adapter the way `caddy adapt` does, naming the
// input "Caddyfile" so error messages are stable.
func adaptCaddyfile(caddyfile string) (string, error) {
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return "", err
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, out, "", "\t"); err != nil {
		return "", err
	}
	return buf.String(), nil
}

const goldenSep = "\n----------\n"

// TestCaddyfileAdapt reads testdata/caddyfile_adapt/*.caddyfiletest: a
// Caddyfile, a "----------" line, then either the JSON it adapts to or, for
// files named error_*, the error it must fail with (file:line included).
func TestCaddyfileAdapt(t *testing.T) {
	eachGolden(t, "testdata/caddyfile_adapt", func(t *testing.T, file, name, input, want string) {
		got, err := adaptCaddyfile(input)
		if strings.HasPrefix(name, "error_") {
			if err == nil {
				t.Fatalf("adapted without error, want %q; got:\n%s", want, got)
			}
			got = err.Error()
			if *updateGolden {
				writeGolden(t, file, input, got)
				return
			}
			if !strings.Contains(got, want) {
				t.Fatalf("error\n  got:  %s\n  want: %s", got, want)
			}
			return
		}
		if err != nil {
			t.Fatalf("adapt: %v", err)
		}
		if *updateGolden {
			writeGolden(t, file, input, got)
			return
		}
		if got != want {
			t.Fatalf("adapted JSON differs from %s (go test -run TestCaddyfileAdapt -update-golden rewrites it):\n%s", file, lineDiff(want, got))
		}
	})
}

// eachGolden runs check as a subtest for every *.caddyfiletest in dir, with
// the file's Caddyfile part (input) and its expected part (want, trimmed).
func eachGolden(t *testing.T, dir string, check func(t *testing.T, file, name, input, want string)) {
	files, err := filepath.Glob(filepath.Join(dir, "*.caddyfiletest"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files in %s: %v", dir, err)
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), ".caddyfiletest")
		t.Run(name, func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			input, want, ok := strings.Cut(string(raw), goldenSep)
			if !ok {
				t.Fatalf("%s: no %q separator line", file, strings.TrimSpace(goldenSep))
			}
			check(t, file, name, input, strings.TrimSpace(want))
		})
	}
}

// TestCaddyfileExample keeps Caddyfile.example and its adapted JSON in
// testdata/Caddyfile.example.json in step.
func TestCaddyfileExample(t *testing.T) {
	t.Setenv("HEADLESS_OPTIONS", "") // `make demo` fills it in; the golden has it empty
	src, err := os.ReadFile("../Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	got, err := adaptCaddyfile(string(src))
	if err != nil {
		t.Fatalf("Caddyfile.example: %v", err)
	}
	const golden = "testdata/Caddyfile.example.json"
	if *updateGolden {
		if err := os.WriteFile(golden, []byte(got+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got != strings.TrimSpace(string(want)) {
		t.Fatalf("Caddyfile.example adapts differently from %s (-update-golden rewrites it):\n%s", golden, lineDiff(strings.TrimSpace(string(want)), got))
	}
}

func writeGolden(t *testing.T, file, input, output string) {
	t.Helper()
	if err := os.WriteFile(file, []byte(input+goldenSep+output+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// lineDiff shows the lines of want and got around the first difference.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	i := 0
	for i < len(w) && i < len(g) && w[i] == g[i] {
		i++
	}
	var b strings.Builder
	from := max(0, i-3)
	for j := from; j < i; j++ {
		fmt.Fprintf(&b, "  %s\n", w[j])
	}
	for j := i; j < min(len(w), i+6); j++ {
		fmt.Fprintf(&b, "- %s\n", w[j])
	}
	for j := i; j < min(len(g), i+6); j++ {
		fmt.Fprintf(&b, "+ %s\n", g[j])
	}
	return b.String()
}
