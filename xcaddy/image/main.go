// Command image builds the caddy-headless container image without a
// container daemon and without pulling a base image: one layer with a static
// Caddy, a CA bundle and the Caddyfile on an empty base, written as an OCI
// image layout and as a tarball for `docker load`, `podman load` or
// `crane push`. The same inputs give the same digest.
//
//	go run . -caddy ../../bin/caddy -etc-caddy ../../deploy/base/Caddyfile \
//	    -etc-caddy ../../deploy/base/sites.caddy -oci ../../bin/image -tar ../../bin/caddy-image.tar
//
// With -rootfs it writes the same files to a directory instead (the
// Containerfile's build stage does that, as root).
package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var in inputs
	var oci, archive, rootDir, tagName string
	flag.StringVar(&in.caddy, "caddy", "", "static Caddy binary with the plugin (CGO_ENABLED=0, -trimpath)")
	flag.Var((*listFlag)(&in.caddyFiles), "etc-caddy", "file copied into /etc/caddy under its base name (repeatable; one must be the Caddyfile)")
	flag.StringVar(&in.caBundle, "ca", "/etc/ssl/certs/ca-certificates.crt", "PEM CA bundle for /etc/ssl/certs/ca-certificates.crt")
	flag.StringVar(&oci, "oci", "", "write an OCI image layout to this directory")
	flag.StringVar(&archive, "tar", "", "write an image tarball (docker load, podman load, crane push) to this file")
	flag.StringVar(&rootDir, "rootfs", "", "write the root filesystem to this directory instead")
	flag.StringVar(&tagName, "tag", "caddy-headless:dev", "the image's name in the layout and the tarball")
	flag.Parse()
	if err := run(in, oci, archive, rootDir, tagName); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(in inputs, oci, archive, rootDir, tagName string) error {
	if in.caddy == "" {
		return fmt.Errorf("-caddy is required")
	}
	if oci == "" && archive == "" && rootDir == "" {
		return fmt.Errorf("nothing to write: give -oci, -tar or -rootfs")
	}
	created, err := sourceDateEpoch()
	if err != nil {
		return err
	}
	files, plat, err := rootfs(in)
	if err != nil {
		return err
	}
	if !hasCaddyfile(files) {
		return fmt.Errorf("none of -etc-caddy %v is named Caddyfile, the entrypoint's --config /etc/caddy/Caddyfile", in.caddyFiles)
	}
	if rootDir != "" {
		if err := writeDir(rootDir, files, created); err != nil {
			return err
		}
	}
	if oci == "" && archive == "" {
		return nil
	}
	tag, err := name.NewTag(tagName)
	if err != nil {
		return fmt.Errorf("-tag %q: %w", tagName, err)
	}
	img, err := buildImage(files, plat, created)
	if err != nil {
		return err
	}
	if oci != "" {
		if err := writeLayout(oci, img, plat, tag); err != nil {
			return err
		}
	}
	if archive != "" {
		if err := writeArchive(archive, img, tag); err != nil {
			return err
		}
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("%s %s %s/%s\n", tag, digest, plat.os, plat.arch)
	return nil
}

func hasCaddyfile(files []file) bool {
	for _, f := range files {
		if f.path == "/etc/caddy/Caddyfile" {
			return true
		}
	}
	return false
}

// sourceDateEpoch is the time every file and the image are dated:
// $SOURCE_DATE_EPOCH (reproducible-builds.org), else the Unix epoch.
func sourceDateEpoch() (time.Time, error) {
	v := os.Getenv("SOURCE_DATE_EPOCH")
	if v == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q: not a number of seconds", v)
	}
	return time.Unix(n, 0).UTC(), nil
}
