package e2e

import (
	"archive/tar"
	"bytes"
	"io"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// TestSDKTemplates builds templates with the SDK's Template builder
// (template.test.mjs): from the base template with a COPY of local files
// and a RUN that installs a .deb the test builds; from a Dockerfile whose
// image the test builds and serves from a registry on loopback; and the
// bad inputs.
func TestSDKTemplates(t *testing.T) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatalf("busybox (static) is needed to make the test image: scripts/deps.sh --test installs it: %v", err)
	}
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		t.Fatalf("dpkg-deb is needed to make the test package: %v", err)
	}
	reg := httptest.NewServer(registry.New())
	defer reg.Close()
	ref := strings.TrimPrefix(reg.URL, "http://") + "/e2e/busybox:1"
	pushBusybox(t, bb, ref)
	t.Setenv("CUBICLE_E2E_IMAGE", ref)
	t.Setenv("CUBICLE_E2E_DEB", buildDeb(t))
	t.Setenv("CUBICLE_E2E_OTHER_API_KEY", newAPIKey(t, "e2e-templates-other"))
	runNode(t, "template.test.mjs")
}

// pushBusybox pushes to ref a one-layer image of a static busybox: sh,
// the tools the tests use, and a /bin/bash that is sh (the SDK runs
// commands with bash -l -c).
func pushBusybox(t *testing.T, busybox, ref string) {
	bin, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, body []byte) {
		h.Size = int64(len(body))
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write(body)
	}
	for _, d := range []string{"bin/", "etc/", "tmp/", "root/", "home/", "var/", "usr/", "usr/bin/"} {
		add(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755}, nil)
	}
	add(&tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755}, bin)
	for _, app := range []string{"sh", "cat", "echo", "mkdir", "id", "chmod", "chown", "pwd", "ls", "env", "sleep", "true", "grep", "head", "rm"} {
		add(&tar.Header{Name: "bin/" + app, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777}, nil)
	}
	add(&tar.Header{Name: "bin/bash", Typeflag: tar.TypeReg, Mode: 0o755}, []byte("#!/bin/sh\nexec /bin/sh \"$@\"\n"))
	add(&tar.Header{Name: "etc/passwd", Typeflag: tar.TypeReg, Mode: 0o644}, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	add(&tar.Header{Name: "etc/group", Typeflag: tar.TypeReg, Mode: 0o644}, []byte("root:x:0:\n"))
	tw.Close()
	layerTar := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layerTar)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", goruntime.GOARCH
	cf.Config.Env = []string{"PATH=/bin:/usr/bin", "FROM_IMAGE=yes"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
}

// buildDeb makes hello-cubicle_1.0_all.deb, whose script prints a line,
// and returns its directory.
func buildDeb(t *testing.T) string {
	dir := t.TempDir()
	pkg := filepath.Join(dir, "pkg")
	for path, body := range map[string]string{
		"DEBIAN/control":              "Package: hello-cubicle\nVersion: 1.0\nArchitecture: all\nMaintainer: cubicle <e2e@localhost>\nDescription: e2e test package\n",
		"usr/local/bin/hello-cubicle": "#!/bin/sh\necho hello from a package\n",
	} {
		p := filepath.Join(pkg, path)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(pkg, "DEBIAN/control"), 0o644)
	out := filepath.Join(dir, "ctx")
	os.Mkdir(out, 0o755)
	if b, err := exec.Command("dpkg-deb", "--root-owner-group", "--build", pkg, filepath.Join(out, "hello-cubicle_1.0_all.deb")).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb: %v: %s", err, b)
	}
	if err := os.WriteFile(filepath.Join(out, "notes.txt"), []byte("copied from the context\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}
