// Package files serves envd's /files endpoint: GET downloads a file (ranges, gzip),
// POST uploads one or more files streamed straight to disk (multipart or raw body,
// optionally gzip-encoded), owned by the requesting user and tagged with metadata.
// Authentication (access token or URL signature) happens before this package.
package files

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/guest/envd/internal/defaults"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/fsutil"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/identity"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/jsonhttp"
)

// Handler serves GET and POST /files.
type Handler struct {
	log      *slog.Logger
	defaults *defaults.Store
	chown    bool // envd runs as root: give uploaded files to the requesting user
}

// New returns a Handler that takes users and workdir from d.
func New(log *slog.Logger, d *defaults.Store) *Handler {
	return &Handler{log: log, defaults: d, chown: os.Geteuid() == 0}
}

// Entry is one uploaded file in the POST response.
type Entry struct {
	Path     string            `json:"path"`
	Name     string            `json:"name"`
	Type     string            `json:"type"` // always "file"
	Metadata map[string]string `json:"metadata,omitempty"`
}

// statusError is a failure with the HTTP status it answers with.
type statusError struct {
	status int
	err    error
}

func (e *statusError) Error() string { return e.err.Error() }
func (e *statusError) Unwrap() error { return e.err }

func fail(status int, format string, args ...any) *statusError {
	return &statusError{status: status, err: fmt.Errorf(format, args...)}
}

// ServeHTTP dispatches on the method.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var err error
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		err = h.download(w, r)
	case http.MethodPost:
		err = h.upload(w, r)
	default:
		w.Header().Set("Allow", "GET, HEAD, POST")
		err = fail(http.StatusMethodNotAllowed, "method %s not allowed on /files", r.Method)
	}
	if err != nil {
		status := http.StatusInternalServerError
		var se *statusError
		if errors.As(err, &se) {
			status = se.status
		}
		if status >= 500 {
			h.log.Error("files request failed", "method", r.Method, "err", err)
		}
		jsonhttp.Error(w, status, err.Error())
	}
}

// user resolves the request's user and path; the `username` query parameter wins
// over the Authorization header.
func (h *Handler) user(r *http.Request) (*identity.User, error) {
	u, err := h.defaults.User(r.Header, r.URL.Query().Get("username"))
	if err != nil {
		return nil, &statusError{status: http.StatusUnauthorized, err: fmt.Errorf("error looking up user: %w", err)}
	}
	return u, nil
}

func (h *Handler) download(w http.ResponseWriter, r *http.Request) error {
	u, err := h.user(r)
	if err != nil {
		return err
	}
	path, err := h.defaults.Resolve(r.URL.Query().Get("path"), u)
	if err != nil {
		return fail(http.StatusBadRequest, "invalid path: %w", err)
	}
	f, err := os.Open(path)
	if err != nil {
		switch {
		case errors.Is(err, os.ErrNotExist):
			return fail(http.StatusNotFound, "path '%s' does not exist", path)
		case errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.ENAMETOOLONG), errors.Is(err, unix.ELOOP):
			return fail(http.StatusBadRequest, "invalid path '%s': %w", path, err)
		}
		return fail(http.StatusInternalServerError, "error opening file '%s': %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fail(http.StatusInternalServerError, "error reading file '%s': %w", path, err)
	}
	if fi.IsDir() {
		return fail(http.StatusBadRequest, "path '%s' is a directory", path)
	}
	if !fi.Mode().IsRegular() {
		// Devices and pipes have no size to range over and may never end.
		return fail(http.StatusBadRequest, "path '%s' is not a regular file", path)
	}

	enc := NegotiateEncoding(r.Header.Get("Accept-Encoding"))
	if enc == "" {
		return fail(http.StatusNotAcceptable, "no acceptable encoding found, supported: [identity, gzip]")
	}
	w.Header().Set("Vary", "Accept-Encoding")
	ctype := mime.TypeByExtension(filepath.Ext(path))
	if ctype == "" {
		ctype = "application/octet-stream"
	}
	w.Header().Set("Content-Type", ctype)
	// A range is a range of the stored bytes; compressing it would make the
	// offsets meaningless, so ranged requests always get identity.
	if enc != "gzip" || r.Header.Get("Range") != "" {
		http.ServeContent(w, r, fi.Name(), fi.ModTime(), f)
		return nil
	}
	w.Header().Set("Content-Encoding", "gzip")
	w.Header().Set("Last-Modified", fi.ModTime().UTC().Format(http.TimeFormat))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil
	}
	// BestSpeed: the sandbox's CPU is the user's; the SDK asks for gzip to save
	// bandwidth, not for the last percent of ratio.
	zw, _ := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if _, err := io.Copy(zw, f); err != nil {
		h.log.Debug("gzip download aborted", "path", path, "err", err)
		return nil // headers are out; the client sees a truncated body
	}
	if err := zw.Close(); err != nil {
		h.log.Debug("gzip download aborted", "path", path, "err", err)
	}
	return nil
}

func (h *Handler) upload(w http.ResponseWriter, r *http.Request) error {
	u, err := h.user(r)
	if err != nil {
		return err
	}
	entries, err := readUpload(r, func(target string, md map[string]string, src io.Reader) (Entry, error) {
		return h.store(target, src, u, md)
	}, func(target string) (string, error) {
		return h.defaults.Resolve(target, u)
	})
	if err != nil {
		return err
	}
	jsonhttp.Write(w, http.StatusOK, entries)
	return nil
}

// sink receives one file of an upload: where it goes (as the client named it), its
// metadata and its content, to be read to the end.
type sink func(target string, md map[string]string, src io.Reader) (Entry, error)

// readUpload takes an upload request apart — metadata headers, content encoding,
// multipart or raw body — and hands each file to store, streaming. resolve maps a
// client path to the file it names, to refuse two parts for one file.
func readUpload(r *http.Request, store sink, resolve func(string) (string, error)) ([]Entry, error) {
	md, err := fsutil.MetadataFromHeaders(r.Header)
	if err != nil {
		return nil, fail(http.StatusBadRequest, "%w", err)
	}
	body, err := decodedBody(r)
	if err != nil {
		return nil, err
	}
	defer body.Close()

	ctype := r.Header.Get("Content-Type")
	mediaType, params, err := mime.ParseMediaType(ctype)
	if err != nil && ctype != "" {
		return nil, fail(http.StatusBadRequest, "invalid Content-Type: %w", err)
	}
	queryPath := r.URL.Query().Get("path")
	switch {
	case strings.HasPrefix(mediaType, "multipart/"):
		boundary := params["boundary"]
		if boundary == "" {
			return nil, fail(http.StatusBadRequest, "multipart body without boundary")
		}
		return readMultipart(multipart.NewReader(body, boundary), queryPath, md, store, resolve)
	case mediaType == "application/octet-stream" || mediaType == "":
		if queryPath == "" {
			return nil, fail(http.StatusBadRequest, "the path query parameter is required for a raw body upload")
		}
		e, err := store(queryPath, md, body)
		if err != nil {
			return nil, err
		}
		return []Entry{e}, nil
	}
	return nil, fail(http.StatusBadRequest, "unsupported content type %q: expected multipart/form-data or application/octet-stream", mediaType)
}

// readMultipart stores every `file` part; other parts are skipped. A part goes to
// queryPath when given, else to the path in its filename.
func readMultipart(mr *multipart.Reader, queryPath string, md map[string]string, store sink, resolve func(string) (string, error)) ([]Entry, error) {
	entries := []Entry{}
	seen := map[string]bool{}
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fail(http.StatusBadRequest, "error reading multipart body: %w", err)
		}
		e, err := readPart(part, queryPath, md, store, resolve, seen)
		part.Close()
		if err != nil {
			return nil, err
		}
		if e != nil {
			entries = append(entries, *e)
		}
	}
	if len(entries) == 0 {
		return nil, fail(http.StatusBadRequest, "multipart body has no part named \"file\"")
	}
	return entries, nil
}

// readPart stores one multipart part if it is a `file` part (nil Entry otherwise).
func readPart(part *multipart.Part, queryPath string, md map[string]string, store sink, resolve func(string) (string, error), seen map[string]bool) (*Entry, error) {
	if part.FormName() != "file" {
		return nil, nil
	}
	target := queryPath
	if target == "" {
		target = PartFilename(part.Header.Get("Content-Disposition"))
	}
	if target == "" {
		return nil, fail(http.StatusBadRequest, "file part has no filename and no path query parameter was given")
	}
	resolved, err := resolve(target)
	if err != nil {
		return nil, fail(http.StatusBadRequest, "invalid path: %w", err)
	}
	if seen[resolved] {
		return nil, fail(http.StatusBadRequest, "you cannot upload multiple files to the same path '%s' in one upload request", resolved)
	}
	seen[resolved] = true
	e, err := store(target, md, part)
	if err != nil {
		return nil, err
	}
	return &e, nil
}

// store streams src into the file at target (resolved for u), creating parent
// directories, and sets the file's owner and metadata.
func (h *Handler) store(target string, src io.Reader, u *identity.User, md map[string]string) (Entry, error) {
	path, err := h.defaults.Resolve(target, u)
	if err != nil {
		return Entry{}, fail(http.StatusBadRequest, "invalid path: %w", err)
	}
	uid, gid := int(u.UID), int(u.GID)
	if err := fsutil.MkdirAllOwned(filepath.Dir(path), uid, gid, h.chown); err != nil {
		return Entry{}, writeError(err, "error creating parent directories of '%s'", path)
	}
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return Entry{}, fail(http.StatusBadRequest, "path '%s' is a directory", path)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o666)
	if err != nil {
		return Entry{}, writeError(err, "error opening file '%s'", path)
	}
	if h.chown {
		if err := f.Chown(uid, gid); err != nil {
			f.Close()
			return Entry{}, writeError(err, "error changing owner of '%s'", path)
		}
	}
	rec := &readRecorder{r: src}
	_, copyErr := io.Copy(f, rec)
	closeErr := f.Close()
	switch {
	case rec.err != nil:
		return Entry{}, fail(http.StatusBadRequest, "error reading upload body for '%s': %w", path, rec.err)
	case copyErr != nil:
		return Entry{}, writeError(copyErr, "error writing file '%s'", path)
	case closeErr != nil:
		return Entry{}, writeError(closeErr, "error writing file '%s'", path)
	}
	if err := fsutil.ReplaceMetadata(path, md); err != nil {
		return Entry{}, writeError(err, "error storing metadata of '%s'", path)
	}
	return Entry{Path: path, Name: filepath.Base(path), Type: "file", Metadata: md}, nil
}

// writeError classifies a failure writing to disk: a full disk (or quota) is 507,
// which the SDK reports as NotEnoughSpaceError.
func writeError(err error, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	switch {
	case errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT):
		return fail(http.StatusInsufficientStorage, "not enough disk space available: %s: %w", msg, err)
	case errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.EISDIR), errors.Is(err, unix.ENAMETOOLONG), errors.Is(err, unix.ELOOP):
		return fail(http.StatusBadRequest, "%s: %w", msg, err)
	case errors.Is(err, os.ErrPermission):
		return fail(http.StatusForbidden, "%s: %w", msg, err)
	}
	return fail(http.StatusInternalServerError, "%s: %w", msg, err)
}

// readRecorder remembers the first read error, so that a broken upload body (a bad
// client or corrupt gzip: 400) is told apart from a failing disk (5xx).
type readRecorder struct {
	r   io.Reader
	err error
}

func (rr *readRecorder) Read(p []byte) (int, error) {
	n, err := rr.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) && rr.err == nil {
		rr.err = err
	}
	return n, err
}

// decodedBody undoes the request's Content-Encoding (identity or gzip).
func decodedBody(r *http.Request) (io.ReadCloser, error) {
	switch enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
		return r.Body, nil
	case "gzip", "x-gzip":
		zr, err := gzip.NewReader(r.Body)
		if err != nil {
			return nil, fail(http.StatusBadRequest, "invalid gzip body: %w", err)
		}
		return zr, nil
	default:
		return nil, fail(http.StatusUnsupportedMediaType, "unsupported Content-Encoding %q: supported are identity and gzip", enc)
	}
}

// PartFilename returns the filename of a multipart part from its
// Content-Disposition, with its directories. multipart.Part.FileName strips them
// (it applies filepath.Base), but the SDK sends the destination path there.
func PartFilename(contentDisposition string) string {
	_, params, err := mime.ParseMediaType(contentDisposition)
	if err != nil {
		return ""
	}
	return params["filename"]
}

// NegotiateEncoding picks the response encoding for an Accept-Encoding value:
// "gzip", "identity", or "" when the client accepts neither (RFC 9110 section
// 12.5.3). Identity is acceptable unless refused with q=0.
func NegotiateEncoding(accept string) string {
	if strings.TrimSpace(accept) == "" {
		return "identity"
	}
	gzipQ, identityQ, starQ := -1.0, -1.0, -1.0
	for _, item := range strings.Split(accept, ",") {
		name, params, _ := strings.Cut(item, ";")
		q := 1.0
		for _, p := range strings.Split(params, ";") {
			k, v, ok := strings.Cut(strings.TrimSpace(p), "=")
			if ok && strings.EqualFold(strings.TrimSpace(k), "q") {
				f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
				if err != nil || f < 0 || f > 1 {
					f = 0 // a malformed weight is no consent
				}
				q = f
			}
		}
		switch strings.ToLower(strings.TrimSpace(name)) {
		case "gzip", "x-gzip":
			gzipQ = q
		case "identity":
			identityQ = q
		case "*":
			starQ = q
		}
	}
	if gzipQ < 0 {
		gzipQ = max(starQ, 0)
	}
	// Gzip wins whenever the client accepts it, unless it weighs identity higher
	// explicitly: the SDK asks for gzip to save bandwidth.
	explicitIdentity := identityQ >= 0
	if !explicitIdentity {
		identityQ = 1
		if starQ == 0 {
			identityQ = 0
		}
	}
	switch {
	case gzipQ > 0 && (!explicitIdentity || gzipQ >= identityQ):
		return "gzip"
	case identityQ > 0:
		return "identity"
	case gzipQ > 0:
		return "gzip"
	}
	return ""
}
