// Command kube-apiserver is the Kubernetes API server, built from the Go module
// proxy for the integration suite (k8s.io/kubernetes/cmd/kube-apiserver).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
