package oci

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Reference schemes besides a plain registry reference. The names are
// skopeo's transports, written as URLs.
const (
	// SchemeLayout names an OCI image layout directory:
	// oci-layout://DIR, oci-layout://DIR:TAG or oci-layout://DIR@DIGEST.
	// TAG is matched against the org.opencontainers.image.ref.name
	// annotation of index.json's entries.
	SchemeLayout = "oci-layout://"
	// SchemeArchive names a `docker save` tarball: docker-archive://FILE
	// or docker-archive://FILE:REPO:TAG. FILE cannot hold a colon.
	SchemeArchive = "docker-archive://"
	// schemeDocker is an optional prefix of a registry reference.
	schemeDocker = "docker://"
)

// Errors a caller can map to its own codes; every error Resolve or Unpack
// returns for one of these causes wraps the sentinel.
var (
	// ErrInvalidReference: the reference cannot be parsed, has an unknown
	// scheme, or names several images where it must name one (a client
	// error: 400).
	ErrInvalidReference = errors.New("invalid image reference")
	// ErrNotFound: no such image, tag, digest, file or platform (404).
	ErrNotFound = errors.New("image not found")
	// ErrUnauthorized: the registry wants credentials we lack or refuses
	// the ones we have (401/403 from the registry). Registries answer so
	// for repositories that do not exist, too.
	ErrUnauthorized = errors.New("image access denied")
	// ErrPlatform: the image is built for another OS or architecture.
	ErrPlatform = errors.New("image is for another platform")
	// ErrUnreachable: the registry's name does not resolve or nothing
	// answers there (a bad reference more often than an outage).
	ErrUnreachable = errors.New("registry unreachable")
	// ErrInsecure: a registry would have to be spoken to in plain HTTP
	// but is neither loopback nor listed in Options.Insecure.
	ErrInsecure = errors.New("plain HTTP to registry not allowed")
)

// Options tune Resolve. The zero value is ready to use.
type Options struct {
	// Keychain gives registry credentials; nil means
	// authn.DefaultKeychain (~/.docker/config.json, $DOCKER_CONFIG and the
	// credential helpers it names).
	Keychain authn.Keychain
	// Auth, when set, is the credentials for the image's registry, used
	// in place of Keychain: what a build request names (E2B's
	// fromImageRegistry {type: "registry", username, password} is an
	// &authn.Basic).
	Auth authn.Authenticator
	// Insecure lists registries ("host" or "host:port") that may be
	// spoken to in plain HTTP. Loopback registries (localhost, 127.0.0.0/8,
	// ::1) always may; every other one must speak HTTPS, private addresses
	// included.
	Insecure []string
	// Platform is the platform to pick from a multi-platform image; the
	// zero value means linux and the architecture cubicle runs on (a
	// sandbox runs on the host's CPU).
	Platform v1.Platform
	// Transport carries registry requests; nil means
	// remote.DefaultTransport. The plain-HTTP rule above applies to it.
	Transport http.RoundTripper
}

func (o Options) platform() v1.Platform {
	if o.Platform.OS == "" && o.Platform.Architecture == "" {
		return v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	}
	return o.Platform
}

// Resolve finds the image ref names: a registry reference
// ("docker.io/library/alpine:3", "localhost:5000/x@sha256:…", optionally
// prefixed with docker://), an OCI image layout (SchemeLayout) or a
// `docker save` tarball (SchemeArchive). From a multi-platform index it
// picks opts.Platform. Nothing is downloaded but the manifests and the
// config: layers are read by Unpack.
func Resolve(ctx context.Context, ref string, opts Options) (v1.Image, error) {
	var (
		img v1.Image
		err error
	)
	switch {
	case strings.HasPrefix(ref, SchemeLayout):
		img, err = fromLayout(strings.TrimPrefix(ref, SchemeLayout), opts.platform())
	case strings.HasPrefix(ref, SchemeArchive):
		img, err = fromArchive(strings.TrimPrefix(ref, SchemeArchive))
	case strings.Contains(ref, "://") && !strings.HasPrefix(ref, schemeDocker):
		scheme, _, _ := strings.Cut(ref, "://")
		return nil, fmt.Errorf("%w %q: unknown scheme %q (want a registry reference, %s or %s)",
			ErrInvalidReference, ref, scheme+"://", SchemeLayout, SchemeArchive)
	default:
		img, err = fromRegistry(ctx, strings.TrimPrefix(ref, schemeDocker), opts)
	}
	if err != nil {
		return nil, fmt.Errorf("image %q: %w", ref, err)
	}
	if err := checkPlatform(img, opts.platform()); err != nil {
		return nil, fmt.Errorf("image %q: %w", ref, err)
	}
	return img, nil
}

// checkPlatform refuses an image whose config names another OS or
// architecture than want; a config that names none is taken as it is.
func checkPlatform(img v1.Image, want v1.Platform) error {
	cf, err := verifiedConfig(img)
	if err != nil {
		return err
	}
	if cf.OS == "" && cf.Architecture == "" {
		return nil
	}
	have := v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant}
	if !have.Satisfies(v1.Platform{OS: want.OS, Architecture: want.Architecture, Variant: want.Variant}) {
		return fmt.Errorf("%w: it is built for %s, this host runs %s", ErrPlatform, have, want)
	}
	return nil
}

// fromRegistry fetches the manifest (and, for an index, the one for
// platform) of ref from its registry.
func fromRegistry(ctx context.Context, ref string, opts Options) (v1.Image, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidReference, err)
	}
	reg := r.Context().Registry
	if slices.ContainsFunc(opts.Insecure, func(h string) bool { return hostMatches(h, reg.Name()) }) {
		// name.Insecure lets go-containerregistry fall back to plain HTTP
		// when HTTPS fails; for other registries the transport below
		// refuses the fallback.
		if r, err = name.ParseReference(ref, name.Insecure); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidReference, err)
		}
	}
	keychain := opts.Keychain
	if keychain == nil {
		keychain = authn.DefaultKeychain
	}
	base := opts.Transport
	if base == nil {
		base = remote.DefaultTransport
	}
	auth := remote.WithAuthFromKeychain(keychain)
	if opts.Auth != nil {
		auth = remote.WithAuth(opts.Auth)
	}
	ropts := []remote.Option{
		remote.WithContext(ctx),
		auth,
		remote.WithPlatform(opts.platform()),
		remote.WithTransport(httpsOnly{base: base, insecure: opts.Insecure}),
		remote.WithUserAgent("cubicle"),
	}
	desc, err := remote.Get(r, ropts...)
	if err != nil {
		return nil, registryError(err, r)
	}
	if desc.MediaType.IsIndex() {
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, registryError(err, r)
		}
		img, err := pickPlatform(idx, opts.platform())
		if err != nil {
			return nil, registryError(err, r)
		}
		return img, nil
	}
	img, err := desc.Image()
	if err != nil {
		return nil, registryError(err, r)
	}
	return img, nil
}

// registryError wraps err, from a registry request for r, in the sentinel
// that says what went wrong.
func registryError(err error, r name.Reference) error {
	var terr *transport.Error
	if errors.As(err, &terr) {
		switch {
		case terr.StatusCode == http.StatusNotFound ||
			hasCode(terr, transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode):
			return fmt.Errorf("%w in registry %s: %w", ErrNotFound, r.Context().RegistryStr(), err)
		case terr.StatusCode == http.StatusUnauthorized || terr.StatusCode == http.StatusForbidden ||
			hasCode(terr, transport.UnauthorizedErrorCode, transport.DeniedErrorCode):
			return fmt.Errorf("%w by registry %s (the repository may not exist, or needs `docker login`): %w",
				ErrUnauthorized, r.Context().RegistryStr(), err)
		}
	}
	if errors.Is(err, ErrNotFound) || errors.Is(err, ErrInsecure) || errors.Is(err, ErrCorrupt) {
		return err
	}
	var (
		dnsErr *net.DNSError
		opErr  *net.OpError
	)
	if errors.As(err, &dnsErr) || errors.As(err, &opErr) {
		return fmt.Errorf("%w: %s: %w", ErrUnreachable, r.Context().RegistryStr(), err)
	}
	return fmt.Errorf("registry %s: %w", r.Context().RegistryStr(), err)
}

func hasCode(e *transport.Error, codes ...transport.ErrorCode) bool {
	for _, d := range e.Errors {
		if slices.Contains(codes, d.Code) {
			return true
		}
	}
	return false
}

// httpsOnly refuses plain-HTTP requests to hosts that are neither loopback
// nor listed as insecure. go-containerregistry falls back to HTTP by itself
// for RFC 1918 and .local registries; a man in the middle there could then
// serve any image (a tag is not a digest).
type httpsOnly struct {
	base     http.RoundTripper
	insecure []string
}

func (t httpsOnly) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme == "http" && !isLoopback(req.URL.Host) &&
		!slices.ContainsFunc(t.insecure, func(h string) bool { return hostMatches(h, req.URL.Host) }) {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, fmt.Errorf("%w: %s speaks HTTP, not HTTPS; list it in the insecure registries to allow it", ErrInsecure, req.URL.Host)
	}
	return t.base.RoundTrip(req)
}

// hostMatches reports whether the allowed entry ("host" or "host:port")
// covers hostport.
func hostMatches(entry, hostport string) bool {
	if strings.EqualFold(entry, hostport) {
		return true
	}
	host, _, err := net.SplitHostPort(hostport)
	return err == nil && strings.EqualFold(strings.Trim(entry, "[]"), host)
}

// isLoopback reports whether hostport names this machine's loopback.
func isLoopback(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.Trim(host, "[]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// pickPlatform returns the image for want from idx, looking into nested
// indexes too.
func pickPlatform(idx v1.ImageIndex, want v1.Platform) (v1.Image, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	var have []string
	for _, d := range im.Manifests {
		switch {
		case d.MediaType.IsImage():
			if d.Platform == nil {
				continue
			}
			if d.Platform.Satisfies(want) {
				return idx.Image(d.Digest)
			}
			have = append(have, d.Platform.String())
		case d.MediaType.IsIndex():
			child, err := idx.ImageIndex(d.Digest)
			if err != nil {
				return nil, err
			}
			if img, err := pickPlatform(child, want); err == nil {
				return img, nil
			} else if !errors.Is(err, ErrNotFound) {
				return nil, err
			}
		}
	}
	return nil, fmt.Errorf("%w: no %s image in the index (it has %s)", ErrNotFound, want, orNone(have))
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

// refNameAnnotations are the index.json annotations that name an image in an
// OCI layout: the spec's, and containerd's (the full reference).
var refNameAnnotations = []string{"org.opencontainers.image.ref.name", "io.containerd.image.name"}

// fromLayout reads the image spec ("DIR", "DIR:TAG", "DIR@DIGEST") names
// from an OCI image layout.
func fromLayout(spec string, want v1.Platform) (v1.Image, error) {
	dir, tag, digest := spec, "", ""
	if d, dg, ok := strings.Cut(spec, "@"); ok {
		dir, digest = d, dg
	} else if d, t, ok := strings.Cut(spec, ":"); ok {
		dir, tag = d, t
	}
	if dir == "" {
		return nil, fmt.Errorf("%w: %s needs a directory", ErrInvalidReference, SchemeLayout)
	}
	if _, err := os.Stat(dir + "/index.json"); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: no OCI image layout at %s (no index.json)", ErrNotFound, dir)
		}
		return nil, err
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: OCI layout %s: %w", ErrCorrupt, dir, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("%w: OCI layout %s: %w", ErrCorrupt, dir, err)
	}
	var found []v1.Descriptor
	switch {
	case digest != "":
		h, err := v1.NewHash(digest)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidReference, err)
		}
		for _, d := range im.Manifests {
			if d.Digest == h {
				found = append(found, d)
			}
		}
		if len(found) == 0 {
			return nil, fmt.Errorf("%w: no manifest %s in the index of OCI layout %s", ErrNotFound, digest, dir)
		}
	case tag != "":
		for _, d := range im.Manifests {
			for _, a := range refNameAnnotations {
				if d.Annotations[a] == tag {
					found = append(found, d)
					break
				}
			}
		}
		if len(found) == 0 {
			return nil, fmt.Errorf("%w: no image tagged %q in OCI layout %s", ErrNotFound, tag, dir)
		}
	default:
		found = im.Manifests
		if len(found) == 0 {
			return nil, fmt.Errorf("%w: OCI layout %s holds no image", ErrNotFound, dir)
		}
	}
	if len(found) == 1 {
		return layoutImage(idx, found[0], want)
	}
	// Several entries: an index.json that is itself a multi-platform
	// index, or several images of which the caller must name one.
	for _, d := range found {
		if d.Platform == nil || !d.MediaType.IsImage() {
			return nil, fmt.Errorf("%w: OCI layout %s holds %d images; name one with :TAG or @DIGEST", ErrInvalidReference, dir, len(found))
		}
	}
	var have []string
	for _, d := range found {
		if d.Platform.Satisfies(want) {
			return idx.Image(d.Digest)
		}
		have = append(have, d.Platform.String())
	}
	return nil, fmt.Errorf("%w: no %s image in OCI layout %s (it has %s)", ErrNotFound, want, dir, orNone(have))
}

// layoutImage returns the image d names in idx, picking the platform when d
// is an index.
func layoutImage(idx v1.ImageIndex, d v1.Descriptor, want v1.Platform) (v1.Image, error) {
	switch {
	case d.MediaType.IsImage():
		return idx.Image(d.Digest)
	case d.MediaType.IsIndex():
		child, err := idx.ImageIndex(d.Digest)
		if err != nil {
			return nil, err
		}
		return pickPlatform(child, want)
	}
	return nil, fmt.Errorf("%w: %s is a %s, not an image", ErrInvalidReference, d.Digest, mediaTypeOr(d.MediaType))
}

func mediaTypeOr(mt types.MediaType) string {
	if mt == "" {
		return "manifest without a media type"
	}
	return string(mt)
}

// fromArchive reads the image spec ("FILE" or "FILE:REPO:TAG") names from a
// `docker save` tarball.
func fromArchive(spec string) (v1.Image, error) {
	file, ref, _ := strings.Cut(spec, ":")
	if file == "" {
		return nil, fmt.Errorf("%w: %s needs a file", ErrInvalidReference, SchemeArchive)
	}
	if _, err := os.Stat(file); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: no docker-archive file %s", ErrNotFound, file)
		}
		return nil, err
	}
	opener := func() (io.ReadCloser, error) { return os.Open(file) }
	m, err := tarball.LoadManifest(opener)
	if err != nil {
		return nil, fmt.Errorf("%w: docker-archive %s: manifest.json: %w", ErrCorrupt, file, err)
	}
	if ref == "" {
		if len(m) != 1 {
			return nil, fmt.Errorf("%w: docker-archive %s holds %d images; name one with :REPO:TAG", ErrInvalidReference, file, len(m))
		}
		return tarball.Image(opener, nil)
	}
	tag, err := name.NewTag(ref)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidReference, err)
	}
	for _, d := range m {
		for _, rt := range d.RepoTags {
			if t, err := name.NewTag(rt); err == nil && t.Name() == tag.Name() {
				return tarball.Image(opener, &tag)
			}
		}
	}
	return nil, fmt.Errorf("%w: no image tagged %s in docker-archive %s", ErrNotFound, ref, file)
}
