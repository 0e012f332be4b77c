package store

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	envdTok    = "0123456789abcdef0123456789abcdef0123456789abcdef"
	trafficTok = "fedcba9876543210fedcba9876543210fedcba9876543210"
)

// dbBytes is everything the database holds on disk, journal included.
func dbBytes(t *testing.T, dir string) []byte {
	t.Helper()
	var all []byte
	for _, name := range []string{"cubicle.db", "cubicle.db-wal", "cubicle.db-shm"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		all = append(all, b...)
	}
	return all
}

func rawRecord(t *testing.T, s *Store, id string) string {
	t.Helper()
	var rec string
	if err := s.db.QueryRow(`SELECT record FROM sandboxes WHERE id = ?`, id).Scan(&rec); err != nil {
		t.Fatal(err)
	}
	return rec
}

func TestTokensSealedAtRest(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	sb := Sandbox{ID: "aaaaaaaaaaaaaaaaaaaa", State: "running", EnvdAccessToken: envdTok, TrafficToken: trafficTok, APIKeyID: "k1", Owner: "k1"}
	if err := s.PutSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	if rec := rawRecord(t, s, sb.ID); strings.Contains(rec, envdTok) || strings.Contains(rec, trafficTok) || !strings.Contains(rec, "sealedTokens") {
		t.Fatalf("record holds a token in clear: %s", rec)
	}
	got, err := s.ListSandboxes(ctx)
	if err != nil || len(got) != 1 || got[0].EnvdAccessToken != envdTok || got[0].TrafficToken != trafficTok {
		t.Fatalf("ListSandboxes = %+v, %v", got, err)
	}
	s.Close()
	if bytes.Contains(dbBytes(t, dir), []byte(envdTok)) || bytes.Contains(dbBytes(t, dir), []byte(trafficTok)) {
		t.Fatal("a token is in the database files")
	}
	fi, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Size() != keySize {
		t.Fatalf("key file: %v, %v", fi, err)
	}

	// The same key opens them after a reopen.
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s.ListSandboxes(ctx); err != nil || got[0].EnvdAccessToken != envdTok {
		t.Fatalf("after reopen: %+v, %v", got, err)
	}
	// A sealed value copied into another sandbox's row does not open there.
	rec := strings.Replace(rawRecord(t, s, sb.ID), sb.ID, "bbbbbbbbbbbbbbbbbbbb", 1)
	if _, err := s.db.Exec(`INSERT INTO sandboxes (id, record) VALUES (?, ?)`, "bbbbbbbbbbbbbbbbbbbb", rec); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ListSandboxes(ctx); !errors.Is(err, errUnsealable) {
		t.Fatalf("a moved sealed value: %v, want errUnsealable", err)
	}
	if _, err := s.db.Exec(`DELETE FROM sandboxes WHERE id = ?`, "bbbbbbbbbbbbbbbbbbbb"); err != nil {
		t.Fatal(err)
	}
	s.Close()

	// With another key, open refuses, saying why.
	if err := os.WriteFile(filepath.Join(dir, KeyFile), bytes.Repeat([]byte{7}, keySize), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); !errors.Is(err, errUnsealable) {
		t.Fatalf("open with another key: %v, want errUnsealable", err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, KeyFile)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("a readable key file was left %v", fi.Mode())
	}
	// A key of the wrong size is refused.
	os.WriteFile(filepath.Join(dir, KeyFile), []byte("short"), 0o600)
	if _, err := Open(dir); err == nil || !strings.Contains(err.Error(), "not a 32-byte key") {
		t.Fatalf("open with a short key: %v", err)
	}
}

// TestLegacyRecordsSealedAtOpen: records of earlier versions (tokens in
// clear, no owner) keep working, and nothing of the clear tokens stays on
// disk once the store has been opened by this version.
func TestLegacyRecordsSealedAtOpen(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	legacy := `{"id":"cccccccccccccccccccc","templateID":"base","state":"running","envdAccessToken":"` + envdTok +
		`","trafficAccessToken":"` + trafficTok + `","addr":"10.0.0.2","runtime":"gvisor","apiKeyID":"k1"}`
	if _, err := s.db.Exec(`INSERT INTO sandboxes (id, record) VALUES (?, ?)`, "cccccccccccccccccccc", legacy); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if !bytes.Contains(dbBytes(t, dir), []byte(envdTok)) {
		t.Fatal("test setup: the legacy token is not on disk")
	}

	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if rec := rawRecord(t, s, "cccccccccccccccccccc"); strings.Contains(rec, envdTok) || strings.Contains(rec, trafficTok) {
		t.Fatalf("legacy record not sealed: %s", rec)
	}
	got, err := s.ListSandboxes(ctx)
	if err != nil || len(got) != 1 {
		t.Fatalf("ListSandboxes = %+v, %v", got, err)
	}
	if g := got[0]; g.EnvdAccessToken != envdTok || g.TrafficToken != trafficTok || g.Addr != "10.0.0.2" || g.Owner != "k1" {
		t.Fatalf("legacy record read back as %+v", g)
	}
	s.Close()
	if b := dbBytes(t, dir); bytes.Contains(b, []byte(envdTok)) || bytes.Contains(b, []byte(trafficTok)) {
		t.Fatal("a clear token of the legacy record is still in the database files")
	}
}
