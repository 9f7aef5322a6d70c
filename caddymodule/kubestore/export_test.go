package kubestore

import "testing"

// What the external tests (package kubestore_test) use of the fake.

func NewFakeAPIForTest(t *testing.T, namespaces ...string) *fakeAPI {
	return newFakeAPI(t, namespaces...)
}

func (f *fakeAPI) Config(ns string) Config         { return f.config(ns) }
func (f *fakeAPI) Rotate(t *testing.T, write bool) { f.rotate(t, write) }
func (f *fakeAPI) SetDown(d bool)                  { f.setDown(d) }
func (f *fakeAPI) Close()                          { f.srv.Close() }
func (f *fakeAPI) Requests() []string              { return f.requestLog() }
