package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/proxy"
)

// newAPIKey makes another API key in the running server's data directory,
// the way an operator does.
func newAPIKey(t *testing.T, name string) string {
	t.Helper()
	out, err := exec.Command(srv.bin, "keys", "create", "--data-dir", srv.dataDir, "--name", name).Output()
	if err != nil {
		t.Fatalf("cubicle keys create: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// apiCall is one raw request to the API.
func apiCall(t *testing.T, key, method, path, body string) (int, http.Header, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, srv.apiURL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-API-KEY", key)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

type createdSandbox struct {
	SandboxID          string `json:"sandboxID"`
	EnvdAccessToken    string `json:"envdAccessToken"`
	TrafficAccessToken string `json:"trafficAccessToken"`
}

func createRaw(t *testing.T, key, body string) createdSandbox {
	t.Helper()
	code, _, b := apiCall(t, key, "POST", "/v2/sandboxes", body)
	if code != http.StatusCreated {
		t.Fatalf("create: %d %s", code, b)
	}
	var sb createdSandbox
	if err := json.Unmarshal(b, &sb); err != nil || sb.SandboxID == "" || sb.EnvdAccessToken == "" {
		t.Fatalf("create answered %s (%v)", b, err)
	}
	t.Cleanup(func() { apiCall(t, key, "DELETE", "/sandboxes/"+sb.SandboxID, "") })
	return sb
}

// TestTenantWalls drives every route that names a sandbox with a key that
// does not own it: each answers exactly as for a sandbox that does not
// exist, leaks neither of its tokens, and changes nothing; lists and their
// running count show only the caller's own. The owner then uses every
// route. Signed /files URLs work only on the sandbox whose token signed them.
func TestTenantWalls(t *testing.T) {
	owner := srv.apiKey
	other := newAPIKey(t, "e2e-tenant")
	// Private traffic, so that it has a traffic token too.
	a := createRaw(t, owner, `{"templateID":"base","timeout":300,"network":{"allowPublicTraffic":false}}`)
	b := createRaw(t, other, `{"templateID":"base","timeout":300}`)
	secrets := []string{a.EnvdAccessToken, a.TrafficAccessToken}
	if a.TrafficAccessToken == "" {
		t.Fatal("a private-traffic sandbox got no trafficAccessToken")
	}
	_, _, before := apiCall(t, owner, "GET", "/sandboxes/"+a.SandboxID, "")

	routes := []struct {
		method, path, body string
		ownerCode          int // what the owner gets, in this order
	}{
		{"GET", "/sandboxes/{id}", "", 200},
		{"GET", "/sandboxes/{id}/metrics", "", 200},
		{"POST", "/sandboxes/{id}/connect", `{"timeout":300}`, 200},
		{"POST", "/v2/sandboxes/{id}/connect", `{"timeout":300}`, 200},
		{"POST", "/sandboxes/{id}/timeout", `{"timeout":300}`, 204},
		{"POST", "/sandboxes/{id}/refreshes", `{"duration":300}`, 204},
		{"PUT", "/sandboxes/{id}/network", `{"allowOut":["0.0.0.0/0"]}`, 204},
		{"POST", "/sandboxes/{id}/snapshots", `{}`, 201},
		{"POST", "/sandboxes/{id}/fork", `{"timeout":5}`, 201},
		{"POST", "/sandboxes/{id}/rollback", `{"snapshotID":"aaaaaaaaaaaaaaaaaaaa:default"}`, 404},
		{"POST", "/sandboxes/{id}/pause", `{}`, 204},
		{"POST", "/sandboxes/{id}/resume", `{"timeout":300}`, 201},
		{"DELETE", "/sandboxes/{id}", "", 204},
	}
	notFound := func(t *testing.T, key, method, path, body string) []byte {
		t.Helper()
		code, _, got := apiCall(t, key, method, path, body)
		var e struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		}
		if code != 404 || json.Unmarshal(got, &e) != nil || e.Code != 404 || e.Message != "sandbox not found" {
			t.Fatalf("%s %s: %d %s; want 404 {code:404, message:\"sandbox not found\"}", method, path, code, got)
		}
		for _, s := range secrets {
			if bytes.Contains(got, []byte(s)) {
				t.Fatalf("%s %s leaks a token of the sandbox: %s", method, path, got)
			}
		}
		return got
	}
	for _, rt := range routes {
		t.Run("other/"+rt.method+rt.path, func(t *testing.T) {
			got := notFound(t, other, rt.method, strings.ReplaceAll(rt.path, "{id}", a.SandboxID), rt.body)
			// Exactly as for an id nobody has.
			if want := notFound(t, other, rt.method, strings.ReplaceAll(rt.path, "{id}", "nosuchsandbox0000000"), rt.body); !bytes.Equal(got, want) {
				t.Fatalf("answers differ: %s for another's sandbox, %s for none", got, want)
			}
		})
	}
	// Nothing the other key did changed the sandbox.
	if _, _, after := apiCall(t, owner, "GET", "/sandboxes/"+a.SandboxID, ""); !bytes.Equal(before, after) {
		t.Fatalf("the other key changed the sandbox:\nbefore %s\nafter  %s", before, after)
	}

	t.Run("lists", func(t *testing.T) {
		for _, key := range []struct {
			name, key, mine, theirs string
		}{{"owner", owner, a.SandboxID, b.SandboxID}, {"other", other, b.SandboxID, a.SandboxID}} {
			for _, path := range []string{"/sandboxes", "/v2/sandboxes", "/v2/sandboxes?state=running,paused"} {
				code, h, body := apiCall(t, key.key, "GET", path, "")
				var list []struct {
					SandboxID string `json:"sandboxID"`
				}
				if code != 200 || json.Unmarshal(body, &list) != nil {
					t.Fatalf("%s GET %s: %d %s", key.name, path, code, body)
				}
				ids := map[string]bool{}
				for _, s := range list {
					ids[s.SandboxID] = true
				}
				if !ids[key.mine] || ids[key.theirs] {
					t.Fatalf("%s GET %s lists %v; want %s and not %s", key.name, path, ids, key.mine, key.theirs)
				}
				if key.name == "other" && path != "/sandboxes" && h.Get("X-Total-Running") != "1" {
					t.Fatalf("other GET %s: X-Total-Running %q; want 1 (its own only)", path, h.Get("X-Total-Running"))
				}
			}
		}
	})

	t.Run("signed URLs", func(t *testing.T) {
		// A URL signed with a's token reads a's file, and nothing of b's.
		sig := proxy.FileSignature("/etc/hostname", "read", "user", a.EnvdAccessToken, "")
		q := url.Values{"path": {"/etc/hostname"}, "username": {"user"}, "signature": {sig}}.Encode()
		get := func(id string) int {
			req, _ := http.NewRequest("GET", srv.sandboxURL+"/files?"+q, nil)
			if id != "" {
				req.Header.Set("E2b-Sandbox-Id", id)
				req.Header.Set("E2b-Sandbox-Port", "49983")
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			return resp.StatusCode
		}
		if code := get(a.SandboxID); code != 200 {
			t.Fatalf("a's signed URL on a: %d", code)
		}
		if code := get(b.SandboxID); code != 401 {
			t.Fatalf("a's signed URL on b: %d; want 401", code)
		}
		// Without sandbox headers (old SDKs) it finds a, never b.
		if code := get(""); code != 200 {
			t.Fatalf("a's signed URL without headers: %d", code)
		}
	})

	t.Run("snapshots", func(t *testing.T) {
		code, _, body := apiCall(t, owner, "POST", "/sandboxes/"+a.SandboxID+"/snapshots", `{}`)
		var sn struct {
			SnapshotID string `json:"snapshotID"`
		}
		if code != 201 || json.Unmarshal(body, &sn) != nil || sn.SnapshotID == "" {
			t.Fatalf("owner's snapshot: %d %s", code, body)
		}
		if _, _, list := apiCall(t, other, "GET", "/snapshots", ""); bytes.Contains(list, []byte(sn.SnapshotID)) {
			t.Fatalf("the other key lists the owner's snapshot: %s", list)
		}
		if code, _, body := apiCall(t, other, "POST", "/v2/sandboxes", `{"templateID":"`+sn.SnapshotID+`"}`); code != 404 {
			t.Fatalf("the other key creates from the owner's snapshot: %d %s", code, body)
		}
		if code, _, body := apiCall(t, other, "DELETE", "/templates/"+sn.SnapshotID, ""); code != 404 {
			t.Fatalf("the other key deletes the owner's snapshot: %d %s", code, body)
		}
		if code, _, body := apiCall(t, owner, "DELETE", "/templates/"+sn.SnapshotID, ""); code != 204 {
			t.Fatalf("the owner deletes its snapshot: %d %s", code, body)
		}
	})

	// The owner uses every route, in an order that ends with the kill.
	for _, rt := range routes {
		path := strings.ReplaceAll(rt.path, "{id}", a.SandboxID)
		if code, _, body := apiCall(t, owner, rt.method, path, rt.body); code != rt.ownerCode {
			t.Fatalf("owner %s %s: %d %s; want %d", rt.method, path, code, body, rt.ownerCode)
		}
	}
}

// TestTenantWallsSDK checks the wall as the E2B SDK sees it.
func TestTenantWallsSDK(t *testing.T) {
	t.Setenv("CUBICLE_E2E_OTHER_API_KEY", newAPIKey(t, "e2e-tenant-sdk"))
	runNode(t, "tenant.test.mjs")
}
