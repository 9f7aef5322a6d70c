package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// The runtime settings of the image. The Containerfile states the same
// values; image_test.go holds them to it.
var (
	imageUser       = fmt.Sprintf("%d:%d", uid, uid)
	imageEnv        = []string{"PATH=/usr/bin", "XDG_DATA_HOME=/data", "XDG_CONFIG_HOME=/config"}
	imageEntrypoint = []string{"/usr/bin/caddy", "run", "--config", "/etc/caddy/Caddyfile"}
	imagePorts      = []string{"80/tcp", "443/tcp", "443/udp"}
	imageWorkdir    = "/"
)

// buildImage makes the image: one layer holding files on an empty base (no
// base image is pulled), an OCI config with the settings above, every time
// fixed to created.
func buildImage(files []file, plat platform, created time.Time) (v1.Image, error) {
	var tarBytes bytes.Buffer
	if err := writeTar(&tarBytes, files, created); err != nil {
		return nil, err
	}
	raw := tarBytes.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(raw)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, err
	}
	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	img, err := mutate.Append(base, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: "caddy-headless xcaddy/image: Caddy with the plugin, CA bundle, Caddyfile",
		},
	})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = plat.os, plat.arch, plat.variant
	cf.Created = v1.Time{Time: created}
	cf.Config = v1.Config{
		User:         imageUser,
		Env:          imageEnv,
		Entrypoint:   imageEntrypoint,
		WorkingDir:   imageWorkdir,
		ExposedPorts: map[string]struct{}{},
		Labels: map[string]string{
			"org.opencontainers.image.title":  "caddy-headless",
			"org.opencontainers.image.source": "https://github.com/caddy-headless/caddy-headless",
		},
	}
	for _, p := range imagePorts {
		cf.Config.ExposedPorts[p] = struct{}{}
	}
	return mutate.ConfigFile(img, cf)
}

// writeLayout writes img as the only image of an OCI image layout at dir
// (replacing what was there), tagged tag.
func writeLayout(dir string, img v1.Image, plat platform, tag name.Tag) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	return p.AppendImage(img,
		layout.WithPlatform(v1.Platform{OS: plat.os, Architecture: plat.arch, Variant: plat.variant}),
		layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag.String()}))
}

// writeArchive writes img as a tarball that `docker load`, `podman load` and
// `crane push` read.
func writeArchive(path string, img v1.Image, tag name.Tag) error {
	tmp := path + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, img); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}
