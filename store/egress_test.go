package store

import (
	"context"
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/cubicle-dev/cubicle/network/egress"
)

// TestEgressRecordsReadBack: a record whose policy was written when the
// type was runtime.Egress (its JSON taken verbatim from such a database)
// reads back as the same egress.Policy, and is written again in the same
// shape, so no database needs migrating.
func TestEgressRecordsReadBack(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	const id = "eeeeeeeeeeeeeeeeeeee"
	const oldEgress = `{"allowInternet":false,"allowOut":["10.0.0.0/8","1.1.1.1/32"],"allowDomains":["example.com","*.pypi.org"],"denyOut":["0.0.0.0/0"]}`
	old := `{"id":"` + id + `","templateID":"base","state":"running","startedAt":"2026-01-02T03:04:05Z","endAt":"2026-01-02T04:04:05Z",` +
		`"timeoutSeconds":3600,"cpuCount":2,"memoryMB":512,"diskSizeMB":1024,"autoPause":false,"autoResume":false,"allowInternetAccess":false,` +
		`"network":{"allowOut":["10.0.0.0/8","1.1.1.1","example.com","*.pypi.org"],"denyOut":["0.0.0.0/0"]},` +
		`"egress":` + oldEgress + `,"addr":"100.96.0.2","runtime":"gvisor","apiKeyID":"k1","owner":"k1"}`
	if _, err := s.db.Exec(`INSERT INTO sandboxes (id, record) VALUES (?, ?)`, id, old); err != nil {
		t.Fatal(err)
	}

	want := &egress.Policy{
		AllowInternet: false,
		AllowOut:      []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("1.1.1.1/32")},
		AllowDomains:  []string{"example.com", "*.pypi.org"},
		DenyOut:       []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
	}
	check := func(when string) {
		t.Helper()
		got, err := s.ListSandboxes(ctx)
		if err != nil || len(got) != 1 {
			t.Fatalf("%s: ListSandboxes = %+v, %v", when, got, err)
		}
		if !reflect.DeepEqual(got[0].Egress, want) {
			t.Fatalf("%s: policy read back as %+v, want %+v", when, got[0].Egress, want)
		}
	}
	check("old row")

	// Reopened (which rewrites records it seals) and written again by
	// this version: the same JSON under "egress".
	s.Close()
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	check("after reopen")
	recs, _ := s.ListSandboxes(ctx)
	if err := s.PutSandbox(ctx, recs[0]); err != nil {
		t.Fatal(err)
	}
	check("rewritten")
	var raw struct {
		Egress json.RawMessage `json:"egress"`
	}
	if err := json.Unmarshal([]byte(rawRecord(t, s, id)), &raw); err != nil {
		t.Fatal(err)
	}
	if string(raw.Egress) != oldEgress {
		t.Fatalf("policy written as %s, want %s", raw.Egress, oldEgress)
	}

	// A record with no policy (the default) has none written either.
	recs[0].ID, recs[0].Egress = "ffffffffffffffffffff", nil
	if err := s.PutSandbox(ctx, recs[0]); err != nil {
		t.Fatal(err)
	}
	if rec := rawRecord(t, s, recs[0].ID); strings.Contains(rec, `"egress"`) {
		t.Fatalf("a default policy was written: %s", rec)
	}
}
