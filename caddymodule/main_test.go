package caddymodule

import (
	"testing"

	"github.com/caddy-headless/caddy-headless/internal/testhome"
)

// The tests run Caddy in this process: its autosaved config and its default
// storage go to a temporary directory, not into the user's home.
func TestMain(m *testing.M) { testhome.Main(m) }

func TestNoWritesToHome(t *testing.T) { testhome.CheckNoWrites(t) }
