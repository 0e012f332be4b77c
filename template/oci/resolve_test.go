package oci

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/compression"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// otherArch is an architecture that is not the host's.
func otherArch() string {
	if runtime.GOARCH == "arm64" {
		return "amd64"
	}
	return "arm64"
}

// archImage is an image for arch whose file /arch holds arch's name.
func archImage(t testing.TB, arch string) v1.Image {
	t.Helper()
	return imageOf(t, arch, layerOf(t, compression.GZip, file("arch", arch)))
}

// multiArch is an index of images for the archs.
func multiArch(t testing.TB, archs ...string) v1.ImageIndex {
	t.Helper()
	var adds []mutate.IndexAddendum
	for _, a := range archs {
		adds = append(adds, mutate.IndexAddendum{
			Add:        archImage(t, a),
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: a}},
		})
	}
	return mutate.AppendManifests(empty.Index, adds...)
}

// unpackedFile resolves ref, unpacks it and returns the content of path in
// it.
func unpackedFile(t *testing.T, ref string, opts Options, path string) string {
	t.Helper()
	img, err := Resolve(context.Background(), ref, opts)
	if err != nil {
		t.Fatalf("Resolve(%s): %v", ref, err)
	}
	_, dst := sandbox(t)
	if _, err := Unpack(context.Background(), img, dst); err != nil {
		t.Fatalf("Unpack(%s): %v", ref, err)
	}
	return readFile(t, filepath.Join(dst, path))
}

// wantErr fails unless err wraps target and says every one of says.
func wantErr(t *testing.T, what string, err, target error, says ...string) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Errorf("%s: %v, want %v", what, err, target)
		return
	}
	for _, s := range says {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("%s: %q does not say %q", what, err, s)
		}
	}
}

func TestResolveRegistry(t *testing.T) {
	ctx := context.Background()
	host := startRegistry(t, nil)
	img := hostImage(t, []ent{file("hello", "from the registry")})
	push(t, host+"/test/app:1", img)
	digest, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{host + "/test/app:1", host + "/test/app@" + digest.String(), "docker://" + host + "/test/app:1"} {
		if got := unpackedFile(t, ref, Options{}, "hello"); got != "from the registry" {
			t.Errorf("%s: hello = %q", ref, got)
		}
	}

	idx := multiArch(t, otherArch(), runtime.GOARCH)
	r, _ := name.ParseReference(host + "/test/multi:1")
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatal(err)
	}
	if got := unpackedFile(t, host+"/test/multi:1", Options{}, "arch"); got != runtime.GOARCH {
		t.Errorf("from a multi-platform index: got the %s image, want %s", got, runtime.GOARCH)
	}
	if got := unpackedFile(t, host+"/test/multi:1", Options{Platform: v1.Platform{OS: "linux", Architecture: otherArch()}}, "arch"); got != otherArch() {
		t.Errorf("asking for %s: got the %s image", otherArch(), got)
	}
	r, _ = name.ParseReference(host + "/test/foreign:1")
	if err := remote.WriteIndex(r, multiArch(t, otherArch())); err != nil {
		t.Fatal(err)
	}
	push(t, host+"/test/foreign-single:1", archImage(t, otherArch()))

	for _, tc := range []struct {
		ref    string
		target error
		says   []string
	}{
		{host + "/test/missing:1", ErrNotFound, []string{`image "` + host + `/test/missing:1"`, "not found in registry " + host}},
		{host + "/test/app:nope", ErrNotFound, []string{"not found in registry " + host}},
		{host + "/test/app@sha256:" + strings.Repeat("0", 64), ErrNotFound, nil},
		{host + "/test/foreign:1", ErrNotFound, []string{"no linux/" + runtime.GOARCH + " image", "linux/" + otherArch()}},
		{host + "/test/foreign-single:1", ErrPlatform, []string{"built for linux/" + otherArch()}},
		{"ftp://" + host + "/x", ErrInvalidReference, []string{`unknown scheme "ftp://"`}},
		{host + "/UPPER/case:1", ErrInvalidReference, nil},
		{"", ErrInvalidReference, nil},
		{"127.0.0.1:1/test/app:1", ErrUnreachable, []string{"registry unreachable: 127.0.0.1:1", "connection refused"}},
	} {
		_, err := Resolve(ctx, tc.ref, Options{})
		wantErr(t, "Resolve("+tc.ref+")", err, tc.target, tc.says...)
	}
}

// TestResolveAuth: credentials come from ~/.docker/config.json (here
// $DOCKER_CONFIG) for a registry that wants them.
func TestResolveAuth(t *testing.T) {
	const user, pass = "agent", "s3cret"
	host := startRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="cubicle-test"`)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusUnauthorized)
				fmt.Fprint(w, `{"errors":[{"code":"UNAUTHORIZED","message":"who are you"}]}`)
				return
			}
			h.ServeHTTP(w, r)
		})
	})
	r, _ := name.ParseReference(host + "/private/app:1")
	if err := remote.Write(r, hostImage(t, []ent{file("secret", "ok")}), remote.WithAuth(&authn.Basic{Username: user, Password: pass})); err != nil {
		t.Fatal(err)
	}

	writeConfig := func(u, p string) {
		dir := t.TempDir()
		auth := base64.StdEncoding.EncodeToString([]byte(u + ":" + p))
		cfg := fmt.Sprintf(`{"auths": {%q: {"auth": %q}}}`, host, auth)
		if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Setenv("DOCKER_CONFIG", dir)
	}
	writeConfig(user, pass)
	if got := unpackedFile(t, host+"/private/app:1", Options{}, "secret"); got != "ok" {
		t.Errorf("secret = %q", got)
	}
	writeConfig(user, "wrong")
	_, err := Resolve(context.Background(), host+"/private/app:1", Options{})
	wantErr(t, "Resolve with a wrong password", err, ErrUnauthorized, "registry "+host)
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	_, err = Resolve(context.Background(), host+"/private/app:1", Options{})
	wantErr(t, "Resolve without credentials", err, ErrUnauthorized)

	// Credentials a build request carries, in place of the keychain.
	if got := unpackedFile(t, host+"/private/app:1", Options{Auth: &authn.Basic{Username: user, Password: pass}}, "secret"); got != "ok" {
		t.Errorf("with Options.Auth: secret = %q", got)
	}
	_, err = Resolve(context.Background(), host+"/private/app:1", Options{Auth: &authn.Basic{Username: user, Password: "nope"}})
	wantErr(t, "Resolve with a wrong Options.Auth", err, ErrUnauthorized)
}

func TestResolveLayout(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	v1img := hostImage(t, []ent{file("v", "1")})
	v2img := hostImage(t, []ent{file("v", "2")})
	for tag, img := range map[string]v1.Image{"v1": v1img, "v2": v2img} {
		if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": tag})); err != nil {
			t.Fatal(err)
		}
	}
	d2, _ := v2img.Digest()
	for ref, want := range map[string]string{
		"oci-layout://" + dir + ":v1":             "1",
		"oci-layout://" + dir + ":v2":             "2",
		"oci-layout://" + dir + "@" + d2.String(): "2",
	} {
		if got := unpackedFile(t, ref, Options{}, "v"); got != want {
			t.Errorf("%s: v = %q, want %q", ref, got, want)
		}
	}

	// One image: no tag needed. A multi-platform index: the host's.
	single := t.TempDir()
	if _, err := layout.Write(single, mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: v1img})); err != nil {
		t.Fatal(err)
	}
	if got := unpackedFile(t, "oci-layout://"+single, Options{}, "v"); got != "1" {
		t.Errorf("single-image layout: v = %q", got)
	}
	multi := t.TempDir()
	lm, err := layout.Write(multi, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lm.AppendIndex(multiArch(t, otherArch(), runtime.GOARCH)); err != nil {
		t.Fatal(err)
	}
	if got := unpackedFile(t, "oci-layout://"+multi, Options{}, "arch"); got != runtime.GOARCH {
		t.Errorf("multi-platform layout: got the %s image", got)
	}
	flat := t.TempDir()
	if _, err := layout.Write(flat, multiArch(t, otherArch(), runtime.GOARCH)); err != nil {
		t.Fatal(err)
	}
	if got := unpackedFile(t, "oci-layout://"+flat, Options{}, "arch"); got != runtime.GOARCH {
		t.Errorf("layout whose index.json lists platforms: got the %s image", got)
	}

	for _, tc := range []struct {
		ref    string
		target error
		says   []string
	}{
		{"oci-layout://" + dir, ErrInvalidReference, []string{"holds 2 images", ":TAG or @DIGEST"}},
		{"oci-layout://" + dir + ":v3", ErrNotFound, []string{`no image tagged "v3"`}},
		{"oci-layout://" + dir + "@sha256:" + strings.Repeat("1", 64), ErrNotFound, nil},
		{"oci-layout://" + dir + "@nonsense", ErrInvalidReference, nil},
		{"oci-layout://" + filepath.Join(dir, "nowhere"), ErrNotFound, []string{"no OCI image layout"}},
		{"oci-layout://", ErrInvalidReference, nil},
	} {
		_, err := Resolve(ctx, tc.ref, Options{})
		wantErr(t, "Resolve("+tc.ref+")", err, tc.target, tc.says...)
	}
}

func TestResolveArchive(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	one := filepath.Join(dir, "one.tar")
	tag, _ := name.NewTag("test/app:1")
	if err := tarball.WriteToFile(one, tag, hostImage(t, []ent{file("v", "one")})); err != nil {
		t.Fatal(err)
	}
	two := filepath.Join(dir, "two.tar")
	tagA, _ := name.NewTag("test/a:1")
	tagB, _ := name.NewTag("registry.example/test/b:2")
	if err := tarball.MultiWriteToFile(two, map[name.Tag]v1.Image{
		tagA: hostImage(t, []ent{file("v", "a")}),
		tagB: hostImage(t, []ent{file("v", "b")}),
	}); err != nil {
		t.Fatal(err)
	}
	for ref, want := range map[string]string{
		"docker-archive://" + one:                                "one",
		"docker-archive://" + one + ":test/app:1":                "one",
		"docker-archive://" + two + ":test/a:1":                  "a",
		"docker-archive://" + two + ":docker.io/test/a:1":        "a",
		"docker-archive://" + two + ":registry.example/test/b:2": "b",
	} {
		if got := unpackedFile(t, ref, Options{}, "v"); got != want {
			t.Errorf("%s: v = %q, want %q", ref, got, want)
		}
	}
	for _, tc := range []struct {
		ref    string
		target error
		says   []string
	}{
		{"docker-archive://" + two, ErrInvalidReference, []string{"holds 2 images"}},
		{"docker-archive://" + two + ":test/c:1", ErrNotFound, []string{"no image tagged test/c:1"}},
		{"docker-archive://" + filepath.Join(dir, "nowhere.tar"), ErrNotFound, nil},
		{"docker-archive://" + dir + "/../" + filepath.Base(dir) + "/one.tar:UPPER", ErrInvalidReference, nil},
	} {
		_, err := Resolve(ctx, tc.ref, Options{})
		wantErr(t, "Resolve("+tc.ref+")", err, tc.target, tc.says...)
	}
}

// TestPlainHTTPRule: only loopback and listed registries are spoken to in
// plain HTTP; go-containerregistry alone would fall back to it for any
// private address.
func TestPlainHTTPRule(t *testing.T) {
	var asked []string
	base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		asked = append(asked, r.URL.Scheme+"://"+r.URL.Host)
		return nil, errors.New("no network in this test")
	})
	for _, tc := range []struct {
		url      string
		insecure []string
		allowed  bool
	}{
		{"http://127.0.0.1:5000/v2/", nil, true},
		{"http://localhost:5000/v2/", nil, true},
		{"http://[::1]:5000/v2/", nil, true},
		{"http://10.1.2.3:5000/v2/", nil, false},
		{"http://192.168.1.1/v2/", nil, false},
		{"http://registry.local:5000/v2/", nil, false},
		{"http://10.1.2.3:5000/v2/", []string{"10.1.2.3:5000"}, true},
		{"http://10.1.2.3:5000/v2/", []string{"10.1.2.3"}, true},
		{"http://10.1.2.3:5000/v2/", []string{"10.1.2.4"}, false},
		{"https://10.1.2.3:5000/v2/", nil, true},
	} {
		asked = nil
		req, _ := http.NewRequest(http.MethodGet, tc.url, nil)
		_, err := httpsOnly{base: base, insecure: tc.insecure}.RoundTrip(req)
		if got := len(asked) == 1; got != tc.allowed {
			t.Errorf("%s with insecure %v: sent %v, want sent %v", tc.url, tc.insecure, got, tc.allowed)
		}
		if !tc.allowed && !errors.Is(err, ErrInsecure) {
			t.Errorf("%s: %v, want ErrInsecure", tc.url, err)
		}
	}

	// Through Resolve: HTTPS is tried, fails, and the HTTP fallback is
	// refused before it leaves.
	asked = nil
	_, err := Resolve(context.Background(), "10.1.2.3:5000/x:1", Options{Transport: base})
	if err == nil {
		t.Fatal("Resolve from an unreachable registry succeeded")
	}
	for _, a := range asked {
		if strings.HasPrefix(a, "http://") {
			t.Errorf("a plain HTTP request went to %s", a)
		}
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
