package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestAPIKeys(t *testing.T) {
	ctx := context.Background()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	k, secret, err := s.CreateAPIKey(ctx, "first")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^e2b_[0-9a-f]+$`).MatchString(secret) {
		t.Fatalf("secret %q does not match the SDK's key pattern", secret)
	}
	other, otherSecret, err := s.CreateAPIKey(ctx, "second")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.RevokeAPIKey(ctx, other.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.RevokeAPIKey(ctx, other.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second revoke: got %v, want ErrNotFound", err)
	}

	for _, tc := range []struct {
		name, secret string
		ok           bool
	}{
		{"valid", secret, true},
		{"revoked", otherSecret, false},
		{"unknown", "e2b_00", false},
		{"empty", "", false},
		{"prefix of valid", secret[:len(secret)-1], false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := s.VerifyAPIKey(ctx, tc.secret)
			if tc.ok {
				if err != nil || got.ID != k.ID {
					t.Fatalf("VerifyAPIKey = %+v, %v; want key %s", got, err, k.ID)
				}
				return
			}
			if !errors.Is(err, ErrNotFound) {
				t.Fatalf("VerifyAPIKey = %v, want ErrNotFound", err)
			}
		})
	}

	keys, err := s.ListAPIKeys(ctx)
	if err != nil || len(keys) != 2 {
		t.Fatalf("ListAPIKeys = %d keys, %v", len(keys), err)
	}
	if keys[1].RevokedAt == nil || keys[0].RevokedAt != nil {
		t.Fatalf("revocation not recorded: %+v", keys)
	}
	if n, err := s.CountActiveAPIKeys(ctx); err != nil || n != 1 {
		t.Fatalf("CountActiveAPIKeys = %d, %v; want 1", n, err)
	}
}

func TestSandboxesSurviveReopen(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	sb := Sandbox{
		ID: "abcdefghij0123456789", TemplateID: "base", State: "running",
		StartedAt: time.Now().UTC().Truncate(time.Second), EndAt: time.Now().Add(time.Minute).UTC().Truncate(time.Second),
		Metadata: map[string]string{"k": "v"}, EnvdAccessToken: "tok",
	}
	if err := s.PutSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	sb.State = "paused"
	if err := s.PutSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s, err = Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err := s.ListSandboxes(ctx)
	if err != nil || len(got) != 1 {
		t.Fatalf("ListSandboxes = %v, %v", got, err)
	}
	if got[0].State != "paused" || got[0].Metadata["k"] != "v" || !got[0].EndAt.Equal(sb.EndAt) {
		t.Fatalf("record changed across reopen: %+v", got[0])
	}
	if err := s.DeleteSandbox(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSandbox(ctx, sb.ID); err != nil {
		t.Fatalf("deleting a missing record: %v", err)
	}
	if got, _ := s.ListSandboxes(ctx); len(got) != 0 {
		t.Fatalf("record still there after delete: %v", got)
	}
}

func TestEvents(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	for _, e := range []Event{
		{SandboxID: "a", TemplateID: "base", Owner: "k1", Type: EventKilled, Reason: EventReasonRequest, Time: at},
		{SandboxID: "b", TemplateID: "base", Type: EventDied, Reason: "oom"},
		{SandboxID: "a", TemplateID: "base", Owner: "k1", Type: EventDied, Reason: "exited"},
	} {
		if _, err := s.AddEvent(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	// Events outlive a restart.
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	all, err := s.ListEvents(ctx, "", 0, 0)
	if err != nil || len(all) != 3 {
		t.Fatalf("ListEvents = %+v, %v", all, err)
	}
	if all[0].Time != at || all[0].Owner != "k1" || all[0].Reason != EventReasonRequest || all[1].Time.IsZero() {
		t.Fatalf("first events read back as %+v, %+v", all[0], all[1])
	}
	for _, tc := range []struct {
		sandbox     string
		after       int64
		limit       int
		wantReasons string
	}{
		{"a", 0, 0, "request exited"},
		{"b", 0, 0, "oom"},
		{"", all[0].ID, 0, "oom exited"},
		{"", 0, 2, "request oom"},
		{"c", 0, 0, ""},
	} {
		got, err := s.ListEvents(ctx, tc.sandbox, tc.after, tc.limit)
		if err != nil {
			t.Fatal(err)
		}
		var reasons []string
		for _, e := range got {
			reasons = append(reasons, e.Reason)
		}
		if r := strings.Join(reasons, " "); r != tc.wantReasons {
			t.Errorf("ListEvents(%q, %d, %d) reasons = %q, want %q", tc.sandbox, tc.after, tc.limit, r, tc.wantReasons)
		}
	}
}

// TestFilesArePrivate: the database and its -wal and -shm files hold
// secrets; they are 0600 when made, and an older install's 0644 files are
// tightened at open.
func TestFilesArePrivate(t *testing.T) {
	check := func(dir string) {
		t.Helper()
		for _, name := range []string{"cubicle.db", "cubicle.db-wal", "cubicle.db-shm"} {
			fi, err := os.Stat(filepath.Join(dir, name))
			if err != nil {
				t.Fatal(err)
			}
			if m := fi.Mode().Perm(); m&0o077 != 0 {
				t.Errorf("%s is %v, want no access for group and others", name, m)
			}
		}
	}
	ctx := context.Background()
	t.Run("new", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if _, _, err := s.CreateAPIKey(ctx, "k"); err != nil {
			t.Fatal(err)
		}
		check(dir)
	})
	t.Run("existing", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.CreateAPIKey(ctx, "k"); err != nil {
			t.Fatal(err)
		}
		// What an older version left: files readable by everyone, the -wal
		// and -shm still there (as after a crash).
		for _, name := range []string{"cubicle.db", "cubicle.db-wal", "cubicle.db-shm"} {
			if err := os.Chmod(filepath.Join(dir, name), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		s2, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer s2.Close()
		s.Close()
		check(dir)
	})
}
