package store

import (
	"context"
	"errors"
	"strings"
	"testing"
)

func TestVolumes(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	a, err := s.CreateVolume(ctx, "alice", "data")
	if err != nil {
		t.Fatal(err)
	}
	if a.ID == "" || len(a.Token) < 32 || a.Owner != "alice" || a.Name != "data" {
		t.Fatalf("CreateVolume = %+v", a)
	}
	if _, err := s.CreateVolume(ctx, "alice", "data"); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate name: got %v, want ErrExists", err)
	}
	// Names are unique per owner, not across owners.
	b, err := s.CreateVolume(ctx, "bob", "data")
	if err != nil {
		t.Fatal(err)
	}
	if b.ID == a.ID || b.Token == a.Token {
		t.Fatal("two volumes share an ID or a token")
	}
	a2, err := s.CreateVolume(ctx, "alice", "more")
	if err != nil {
		t.Fatal(err)
	}

	list, err := s.ListVolumes(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].ID != a.ID || list[1].ID != a2.ID {
		t.Fatalf("ListVolumes(alice) = %+v", list)
	}
	if got, err := s.VolumeByName(ctx, "bob", "data"); err != nil || got.ID != b.ID {
		t.Fatalf("VolumeByName(bob, data) = %+v, %v", got, err)
	}
	if _, err := s.VolumeByName(ctx, "bob", "more"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("VolumeByName of another owner's name: %v", err)
	}

	for _, tc := range []struct {
		name, id, token string
		ok              bool
	}{
		{"right", a.ID, a.Token, true},
		{"other volume's token", a.ID, b.Token, false},
		{"empty", a.ID, "", false},
		{"prefix", a.ID, a.Token[:len(a.Token)-1], false},
		{"unknown volume", "nope", a.Token, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := s.VerifyVolumeToken(ctx, tc.id, tc.token)
			if tc.ok != (err == nil) || (!tc.ok && !errors.Is(err, ErrNotFound)) || (tc.ok && v.ID != tc.id) {
				t.Fatalf("VerifyVolumeToken = %+v, %v; want ok=%v", v, err, tc.ok)
			}
		})
	}

	// The token is not in the database in clear, and survives a reopen.
	s.Close()
	if strings.Contains(string(dbBytes(t, dir)), a.Token) {
		t.Fatal("a volume token is stored in clear")
	}
	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err := s.GetVolume(ctx, a.ID)
	if err != nil || got.Token != a.Token || got.Name != "data" || !got.CreatedAt.Equal(a.CreatedAt) {
		t.Fatalf("GetVolume after reopen = %+v, %v; want %+v", got, err, a)
	}

	if err := s.DeleteVolume(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume(ctx, a.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	if _, err := s.GetVolume(ctx, a.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetVolume after delete: %v", err)
	}
	// The name is free again.
	if _, err := s.CreateVolume(ctx, "alice", "data"); err != nil {
		t.Fatal(err)
	}
}

// TestVolumeTokenBoundToID: a sealed token moved to another volume's row
// does not open.
func TestVolumeTokenBoundToID(t *testing.T) {
	ctx := context.Background()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	a, _ := s.CreateVolume(ctx, "o", "a")
	b, _ := s.CreateVolume(ctx, "o", "b")
	if _, err := s.db.Exec(`UPDATE volumes SET sealed_token = (SELECT sealed_token FROM volumes WHERE id = ?) WHERE id = ?`, a.ID, b.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetVolume(ctx, b.ID); err == nil || errors.Is(err, ErrNotFound) {
		t.Fatalf("a token moved to another row opened: %v", err)
	}
}

// TestSandboxRecordKeepsVolumes: the mounts a sandbox was made with come
// back with its record, so that a restarted server knows them.
func TestSandboxRecordKeepsVolumes(t *testing.T) {
	ctx := context.Background()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	m := []VolumeMount{{VolumeID: "v1", Name: "data", Path: "/data"}}
	if err := s.PutSandbox(ctx, Sandbox{ID: "sb", Owner: "o", Volumes: m}); err != nil {
		t.Fatal(err)
	}
	got, err := s.ListSandboxes(ctx)
	if err != nil || len(got) != 1 || len(got[0].Volumes) != 1 || got[0].Volumes[0] != m[0] {
		t.Fatalf("ListSandboxes = %+v, %v", got, err)
	}
}
