package codeinterp

// The Jupyter messaging protocol's wire format, version 5.3:
// https://jupyter-client.readthedocs.io/en/stable/messaging.html#the-wire-protocol
//
// A message is a multipart ZeroMQ message:
//
//	[routing ids or topic ...] "<IDS|MSG>" signature header parent_header metadata content [buffers ...]
//
// where signature is the hex HMAC-SHA256, keyed by the connection file's key,
// of the four JSON frames that follow it.

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// protocolVersion is the messaging protocol version we speak (jupyter_client
// 7's, which ipykernel 6 answers).
const protocolVersion = "5.3"

// delimiter separates routing frames from the message proper.
var delimiter = []byte("<IDS|MSG>")

var (
	// errNoDelimiter means a multipart message lacks the <IDS|MSG> frame.
	errNoDelimiter = errors.New("jupyter message: no <IDS|MSG> delimiter")
	// errShortMessage means fewer than the five frames after the delimiter.
	errShortMessage = errors.New("jupyter message: too few frames")
	// errBadSignature means the HMAC does not match: not from our kernel.
	errBadSignature = errors.New("jupyter message: bad signature")
)

// header is a message's header (and, for replies, its parent_header).
type header struct {
	MsgID    string `json:"msg_id"`
	Session  string `json:"session"`
	Username string `json:"username"`
	Date     string `json:"date"`
	MsgType  string `json:"msg_type"`
	Version  string `json:"version"`
}

// message is a decoded Jupyter message. Content stays raw: each msg_type
// decodes its own shape.
type message struct {
	Header       header
	ParentHeader header
	Content      json.RawMessage
}

// signer signs and checks messages with one kernel's key.
type signer struct {
	key []byte
}

// sign returns the hex HMAC-SHA256 of frames, or "" when the key is empty
// (the protocol's "no authentication" mode).
func (s signer) sign(frames ...[]byte) []byte {
	if len(s.key) == 0 {
		return nil
	}
	mac := hmac.New(sha256.New, s.key)
	for _, f := range frames {
		mac.Write(f)
	}
	sum := mac.Sum(nil)
	out := make([]byte, hex.EncodedLen(len(sum)))
	hex.Encode(out, sum)
	return out
}

// encode builds the frames of a request of msgType with content, sent by
// session. It returns the frames and the new message's id.
func (s signer) encode(session, msgType string, content any) ([][]byte, string, error) {
	id := newID()
	h, err := json.Marshal(header{
		MsgID:    id,
		Session:  session,
		Username: "cubicle",
		Date:     time.Now().UTC().Format(time.RFC3339Nano),
		MsgType:  msgType,
		Version:  protocolVersion,
	})
	if err != nil {
		return nil, "", err
	}
	c, err := json.Marshal(content)
	if err != nil {
		return nil, "", fmt.Errorf("encode %s: %w", msgType, err)
	}
	parent, meta := []byte("{}"), []byte("{}")
	return [][]byte{delimiter, s.sign(h, parent, meta, c), h, parent, meta, c}, id, nil
}

// decode parses and authenticates frames received from a kernel.
func (s signer) decode(frames [][]byte) (message, error) {
	i := 0
	for i < len(frames) && !bytes.Equal(frames[i], delimiter) {
		i++
	}
	if i == len(frames) {
		return message{}, errNoDelimiter
	}
	rest := frames[i+1:]
	if len(rest) < 5 {
		return message{}, errShortMessage
	}
	if len(s.key) > 0 && !hmac.Equal(rest[0], s.sign(rest[1], rest[2], rest[3], rest[4])) {
		return message{}, errBadSignature
	}
	var m message
	if err := json.Unmarshal(rest[1], &m.Header); err != nil {
		return message{}, fmt.Errorf("jupyter message header: %w", err)
	}
	// A parent_header is {} on messages nobody asked for.
	if err := json.Unmarshal(rest[2], &m.ParentHeader); err != nil {
		return message{}, fmt.Errorf("jupyter message parent_header: %w", err)
	}
	m.Content = json.RawMessage(rest[4])
	if !json.Valid(m.Content) {
		return message{}, errors.New("jupyter message: content is not JSON")
	}
	return m, nil
}

// newID returns a random UUID (version 4) string: message ids, session ids
// and context ids all take this shape, as Jupyter's do.
func newID() string {
	var b [16]byte
	// crypto/rand.Read never fails on Linux (Go 1.24+).
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
