package store

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestSnapshots(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	const tok = "0123456789abcdef0123456789abcdef"
	mk := func(id, owner, name, sandbox string) Snapshot {
		return Snapshot{ID: id, Owner: owner, Name: name, SandboxID: sandbox, TemplateID: "base",
			CPUCount: 2, MemoryMB: 512, DiskSizeMB: 1024, Runtime: "gvisor", EnvdAccessToken: tok, CreatedAt: time.Now().UTC()}
	}
	for _, sn := range []Snapshot{mk("s1", "alice", "", "sbx1"), mk("s2", "alice", "named", "sbx1"),
		mk("s3", "alice", "other", "sbx2"), mk("s4", "bob", "named", "sbx3")} {
		if err := s.PutSnapshot(ctx, sn); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.PutSnapshot(ctx, mk("s5", "alice", "named", "sbx1")); !errors.Is(err, ErrNameTaken) {
		t.Fatalf("a second snapshot named the same: %v", err)
	}
	var raw string
	if err := s.db.QueryRow(`SELECT record FROM snapshots WHERE id = 's2'`).Scan(&raw); err != nil || strings.Contains(raw, tok) {
		t.Fatalf("the token is in clear (or the record is missing, %v): %s", err, raw)
	}

	// Reopened: everything is still there and opens.
	s.Close()
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		owner, ref, want string
	}{
		{"alice", "s1", "s1"}, {"alice", "named", "s2"}, {"bob", "named", "s4"},
		{"bob", "s1", ""}, {"alice", "s4", ""}, {"alice", "nothing", ""},
	}
	for _, c := range cases {
		sn, err := s.FindSnapshot(ctx, c.owner, c.ref)
		if c.want == "" {
			if !errors.Is(err, ErrNotFound) {
				t.Errorf("%s finds %q: %+v %v", c.owner, c.ref, sn, err)
			}
			continue
		}
		if err != nil || sn.ID != c.want || sn.EnvdAccessToken != tok || sn.MemoryMB != 512 {
			t.Errorf("%s finds %q = %+v, %v; want %s", c.owner, c.ref, sn, err, c.want)
		}
	}

	ids := func(f SnapshotFilter) string {
		t.Helper()
		sns, err := s.ListSnapshots(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, sn := range sns {
			out = append(out, sn.ID)
		}
		return strings.Join(out, ",")
	}
	for _, c := range []struct {
		f    SnapshotFilter
		want string
	}{
		{SnapshotFilter{Owner: "alice"}, "s1,s2,s3"},
		{SnapshotFilter{Owner: "alice", SandboxID: "sbx1"}, "s1,s2"},
		{SnapshotFilter{Owner: "alice", Name: "named"}, "s2"},
		{SnapshotFilter{Owner: "alice", Limit: 2}, "s1,s2"},
		{SnapshotFilter{Owner: "alice", After: "s2"}, "s3"},
		{SnapshotFilter{Owner: "bob"}, "s4"},
	} {
		if got := ids(c.f); got != c.want {
			t.Errorf("ListSnapshots(%+v) = %s, want %s", c.f, got, c.want)
		}
	}
	if err := s.DeleteSnapshot(ctx, "s2"); err != nil {
		t.Fatal(err)
	}
	if got := ids(SnapshotFilter{Owner: "alice"}); got != "s1,s3" {
		t.Errorf("after delete: %s", got)
	}
	// The name is free again.
	if err := s.PutSnapshot(ctx, mk("s6", "alice", "named", "sbx1")); err != nil {
		t.Fatal(err)
	}
}

func TestSandboxEnvVarsSealed(t *testing.T) {
	ctx := context.Background()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	sb := Sandbox{ID: "dddddddddddddddddddd", EnvVars: map[string]string{"SECRET": "hunter2-sealed"}, PausedOnDisk: PausedMemory}
	if err := s.PutSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	if rec := rawRecord(t, s, sb.ID); strings.Contains(rec, "hunter2-sealed") {
		t.Fatalf("an env var is in clear: %s", rec)
	}
	got, err := s.ListSandboxes(ctx)
	if err != nil || len(got) != 1 || got[0].EnvVars["SECRET"] != "hunter2-sealed" || got[0].PausedOnDisk != PausedMemory {
		t.Fatalf("read back %+v, %v", got, err)
	}
}
