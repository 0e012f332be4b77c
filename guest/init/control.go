package guestinit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// ControlPort is the vsock port of the control channel.
const ControlPort = 1024

// MaxRequest is the longest request line the control channel accepts, in
// bytes, without its newline.
const MaxRequest = 64 << 10

// Entropy bounds of the identity request, in decoded bytes.
const (
	minEntropy = 32
	maxEntropy = 512
)

// Request is one control request, as the host sends it.
type Request struct {
	Op string `json:"op"`
	// UnixNano, Entropy and Hostname are the identity request's.
	UnixNano int64  `json:"unixNano,omitempty"`
	Entropy  string `json:"entropy,omitempty"`
	Hostname string `json:"hostname,omitempty"`
}

// Response is the answer to one request.
type Response struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	// Envd is ping's: whether envd answered its /health.
	Envd *bool `json:"envd,omitempty"`
}

// System is what the control channel acts on: the guest's kernel in
// `cubicle init` (see newSystem), a recorder in the protocol's tests.
type System struct {
	SetClock    func(unixNano int64) error
	AddEntropy  func(b []byte) error
	SetHostname func(name string) error
	Sync        func() error
	// PowerOff is called after the poweroff request's response is sent.
	PowerOff func()
	// EnvdUp reports whether envd answers its /health.
	EnvdUp func(ctx context.Context) bool
}

// ParseRequest decodes and checks one request line: exactly one JSON
// object, no unknown fields, a known op with the fields it needs.
func ParseRequest(line []byte) (Request, []byte, error) {
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return Request{}, nil, fmt.Errorf("malformed request: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Request{}, nil, errors.New("malformed request: more than one JSON value on the line")
	}
	switch req.Op {
	case "ping", "sync", "poweroff":
		if req.UnixNano != 0 || req.Entropy != "" || req.Hostname != "" {
			return Request{}, nil, fmt.Errorf("%s takes no fields", req.Op)
		}
		return req, nil, nil
	case "identity":
		if req.UnixNano <= 0 {
			return Request{}, nil, errors.New("identity: unixNano must be a positive time")
		}
		ent, err := base64.StdEncoding.Strict().DecodeString(req.Entropy)
		if err != nil {
			return Request{}, nil, fmt.Errorf("identity: entropy is not base64: %v", err)
		}
		if len(ent) < minEntropy || len(ent) > maxEntropy {
			return Request{}, nil, fmt.Errorf("identity: entropy must be %d to %d bytes, got %d", minEntropy, maxEntropy, len(ent))
		}
		if req.Hostname != "" && !ValidHostname(req.Hostname) {
			return Request{}, nil, fmt.Errorf("identity: hostname %q is not a hostname", req.Hostname)
		}
		return req, ent, nil
	case "":
		return Request{}, nil, errors.New("request has no op")
	default:
		return Request{}, nil, fmt.Errorf("unknown op %q", req.Op)
	}
}

// handle answers one request line. powerOff is set when the response must
// be followed by a power-off.
func (s *System) handle(ctx context.Context, line []byte) (resp Response, powerOff bool) {
	req, entropy, err := ParseRequest(line)
	if err != nil {
		return Response{Error: err.Error()}, false
	}
	fail := func(what string, err error) Response {
		return Response{Error: fmt.Sprintf("%s: %v", what, err)}
	}
	switch req.Op {
	case "ping":
		hctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		up := s.EnvdUp(hctx)
		return Response{OK: true, Envd: &up}, false
	case "identity":
		if err := s.SetClock(req.UnixNano); err != nil {
			return fail("identity: set clock", err), false
		}
		if err := s.AddEntropy(entropy); err != nil {
			return fail("identity: add entropy", err), false
		}
		if req.Hostname != "" {
			if err := s.SetHostname(req.Hostname); err != nil {
				return fail("identity: set hostname", err), false
			}
		}
		return Response{OK: true}, false
	case "sync":
		if err := s.Sync(); err != nil {
			return fail("sync", err), false
		}
		return Response{OK: true}, false
	default: // "poweroff": ParseRequest lets no other op through
		return Response{OK: true}, true
	}
}

// Serve speaks the control protocol on conn until the peer closes it, a
// read or write fails, or ctx ends: one request line in, one response line
// out. It is what the vsock listener runs for each connection.
func (s *System) Serve(ctx context.Context, conn io.ReadWriter) error {
	r := bufio.NewReaderSize(conn, 4096)
	w := bufio.NewWriter(conn)
	for ctx.Err() == nil {
		line, tooLong, err := readLine(r, MaxRequest)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		var resp Response
		var powerOff bool
		if tooLong {
			resp = Response{Error: fmt.Sprintf("request longer than %d bytes", MaxRequest)}
		} else {
			resp, powerOff = s.handle(ctx, line)
		}
		b, _ := json.Marshal(resp) // a Response always marshals
		w.Write(append(b, '\n'))
		if err := w.Flush(); err != nil {
			return err
		}
		if powerOff {
			s.PowerOff()
		}
	}
	return ctx.Err()
}

// readLine reads one line without its newline (and a trailing "\r"). A
// line longer than limit is read to its end and dropped: tooLong reports
// it, so the connection can go on with the next line. A final line
// without a newline counts; io.EOF comes only when nothing was read.
func readLine(r *bufio.Reader, limit int) (line []byte, tooLong bool, err error) {
	var buf []byte
	for {
		frag, err := r.ReadSlice('\n')
		if !tooLong {
			if len(buf)+len(frag) > limit+2 { // room for "\r\n"
				tooLong, buf = true, nil
			} else {
				buf = append(buf, frag...)
			}
		}
		switch {
		case err == nil:
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && (len(buf) > 0 || tooLong):
			// the last line, unterminated
		default:
			return nil, false, err
		}
		buf = bytes.TrimSuffix(buf, []byte("\n"))
		buf = bytes.TrimSuffix(buf, []byte("\r"))
		if len(buf) > limit {
			return nil, true, nil
		}
		return buf, tooLong, nil
	}
}
