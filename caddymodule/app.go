package caddymodule

import (
	"sync"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-headless/caddy-headless/discovery"
)

func init() {
	caddy.RegisterModule(new(headlessApp))
}

// appName is the ID of the app that starts a config's watchers.
const appName = "headless"

// headlessApp starts the watchers of a config when the config starts, and
// not before: Caddy provisions a config that is only validated (`caddy
// validate`, `caddy adapt --validate`, a load that fails) but starts its apps
// only when it runs, so validating asks no DNS. A Headless loads it with
// ctx.App; it needs no configuration. Watchers shared with a running config
// are running already.
type headlessApp struct {
	mu       sync.Mutex
	watchers []*discovery.Watcher
}

// CaddyModule returns the Caddy module information.
func (*headlessApp) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  appName,
		New: func() caddy.Module { return new(headlessApp) },
	}
}

// appOf returns the headless app of ctx's config, loading it the first time.
func appOf(ctx caddy.Context) (*headlessApp, error) {
	a, err := ctx.App(appName)
	if err != nil {
		return nil, err
	}
	return a.(*headlessApp), nil
}

func (a *headlessApp) add(w *discovery.Watcher) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.watchers = append(a.watchers, w)
}

// Start begins the lookups of every watcher of this config.
func (a *headlessApp) Start() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, w := range a.watchers {
		w.Run()
	}
	a.watchers = nil
	return nil
}

// Stop does nothing: the watchers belong to the pool, and stop when the last
// config using them is cleaned up.
func (a *headlessApp) Stop() error { return nil }

// Interface guard
var _ caddy.App = (*headlessApp)(nil)
