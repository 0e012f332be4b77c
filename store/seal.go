package store

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Sandbox secrets at rest. The server must give a sandbox's envd access
// token back to its owner (connect, get) and check its traffic token and
// signed URLs, so the tokens cannot be stored as hashes. They are sealed
// instead, with AES-256-GCM under a key kept in its own file beside the
// database (KeyFile, mode 0600), and bound to the sandbox's ID: the
// database alone — a backup, a copy, a leaked file — yields no token, and a
// sealed value moved to another row does not open. The key is made on
// first open; losing it loses the tokens of the sandboxes alive then (their
// rows no longer open, and Open says so).

// KeyFile is the name, in the data directory, of the key that seals
// sandbox tokens.
const KeyFile = "tokens.key"

const keySize = 32 // AES-256

// sealer seals and opens sandbox tokens.
type sealer struct {
	aead cipher.AEAD
}

// loadSealer reads the key in dir, making it when there is none.
func loadSealer(dir string) (*sealer, error) {
	path := filepath.Join(dir, KeyFile)
	key, err := readKey(path)
	if errors.Is(err, fs.ErrNotExist) {
		key, err = makeKey(dir, path)
	}
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", path, err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", path, err)
	}
	return &sealer{aead: aead}, nil
}

func readKey(path string) ([]byte, error) {
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(key) != keySize {
		return nil, fmt.Errorf("store: %s holds %d bytes, not a %d-byte key", path, len(key), keySize)
	}
	// A key others can read is no secret: take it back.
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(path, 0o600); err != nil {
			return nil, fmt.Errorf("store: restrict %s: %w", path, err)
		}
	}
	return key, nil
}

// makeKey writes a fresh key whole, then links it into place, so that a
// second process opening the store at the same moment (cubicle keys
// create beside cubicle serve) reads either no key or the complete one.
func makeKey(dir, path string) ([]byte, error) {
	key := make([]byte, keySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("store: make token key: %w", err)
	}
	tmp, err := os.CreateTemp(dir, KeyFile+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("store: make token key: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("store: make token key: %w", err)
	}
	if _, err := tmp.Write(key); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("store: make token key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("store: make token key: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("store: make token key: %w", err)
	}
	if err := os.Link(tmp.Name(), path); errors.Is(err, fs.ErrExist) {
		return readKey(path) // another process made it first
	} else if err != nil {
		return nil, fmt.Errorf("store: make token key: %w", err)
	}
	return key, nil
}

// sealedTokens is what a record holds of its sandbox's tokens, once opened.
type sealedTokens struct {
	Envd    string `json:"e,omitempty"`
	Traffic string `json:"t,omitempty"`
	// Env is the sandbox's envVars: a resume that boots it afresh gives
	// them to envd again, and they may be secrets.
	Env map[string]string `json:"v,omitempty"`
}

// additionalData binds a sealed value to its sandbox.
func additionalData(id string) []byte { return []byte("cubicle sandbox tokens v1\x00" + id) }

// seal returns base64(nonce || ciphertext) of plain, for sandbox id.
func (s *sealer) seal(id string, plain []byte) string { return s.sealFor(additionalData(id), plain) }

// sealFor seals plain bound to ad, which says what the value belongs to:
// a value sealed for one thing does not open as another's.
func (s *sealer) sealFor(ad, plain []byte) string {
	nonce := make([]byte, s.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		panic("crypto/rand failed: " + err.Error()) // cannot happen on Linux ≥ 3.17
	}
	return base64.RawStdEncoding.EncodeToString(s.aead.Seal(nonce, nonce, plain, ad))
}

// errUnsealable is a sealed value this key cannot open.
var errUnsealable = errors.New("sealed tokens do not open with " + KeyFile + " (the key was replaced or lost, or the record was altered)")

func (s *sealer) open(id, sealed string) ([]byte, error) {
	return s.openFor(additionalData(id), sealed)
}

// openFor opens what sealFor sealed with the same ad.
func (s *sealer) openFor(ad []byte, sealed string) ([]byte, error) {
	raw, err := base64.RawStdEncoding.DecodeString(sealed)
	n := s.aead.NonceSize()
	if err != nil || len(raw) < n {
		return nil, errUnsealable
	}
	plain, err := s.aead.Open(nil, raw[:n], raw[n:], ad)
	if err != nil {
		return nil, errUnsealable
	}
	return plain, nil
}
