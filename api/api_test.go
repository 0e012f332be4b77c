package api

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/orchestrator"
)

func TestParseNewSandbox(t *testing.T) {
	for _, tc := range []struct {
		name    string
		body    string
		version int
		check   func(orchestrator.CreateRequest) bool
		invalid bool
	}{
		{"v1 default timeout", `{"templateID":"base"}`, 1, func(r orchestrator.CreateRequest) bool { return r.Timeout == 15*time.Second }, false},
		{"v2 default timeout", `{"templateID":"base"}`, 2, func(r orchestrator.CreateRequest) bool { return r.Timeout == 300*time.Second }, false},
		{"explicit timeout", `{"templateID":"base","timeout":42}`, 2, func(r orchestrator.CreateRequest) bool { return r.Timeout == 42*time.Second }, false},
		{"internet on by default", `{"templateID":"base"}`, 2, func(r orchestrator.CreateRequest) bool { return r.AllowInternet && r.PublicTraffic }, false},
		{"internet off, snake_case", `{"templateID":"base","allow_internet_access":false}`, 2, func(r orchestrator.CreateRequest) bool { return !r.AllowInternet }, false},
		{"private traffic", `{"templateID":"base","network":{"allowPublicTraffic":false}}`, 2, func(r orchestrator.CreateRequest) bool { return !r.PublicTraffic }, false},
		{"autoResume object", `{"templateID":"base","autoPause":true,"autoResume":{"enabled":true}}`, 2, func(r orchestrator.CreateRequest) bool { return r.AutoPause && r.AutoResume }, false},
		{"autoResume bool", `{"templateID":"base","autoPause":true,"autoResume":true}`, 2, func(r orchestrator.CreateRequest) bool { return r.AutoResume }, false},
		{"unknown fields ignored", `{"templateID":"base","mcp":{"x":1},"volumeMounts":[],"secure":true}`, 1, func(r orchestrator.CreateRequest) bool { return r.Template == "base" }, false},
		{"metadata and envs", `{"templateID":"t","metadata":{"a":"b"},"envVars":{"X":"1"}}`, 2, func(r orchestrator.CreateRequest) bool { return r.Metadata["a"] == "b" && r.EnvVars["X"] == "1" }, false},
		{"egress rules", `{"templateID":"base","network":{"allowOut":["10.0.0.1","192.168.0.0/16"],"denyOut":["0.0.0.0/0"]}}`, 2, func(r orchestrator.CreateRequest) bool {
			return r.Egress != nil && r.Egress.AllowInternet && len(r.Egress.AllowOut) == 2 && r.Egress.AllowOut[0].Bits() == 32 && len(r.Egress.DenyOut) == 1
		}, false},
		{"egress without internet", `{"templateID":"base","allow_internet_access":false}`, 2, func(r orchestrator.CreateRequest) bool { return r.Egress != nil && !r.Egress.AllowInternet }, false},
		{"domain rules", `{"templateID":"base","network":{"allowOut":["Example.COM.","*.pypi.org","1.1.1.1"],"denyOut":["0.0.0.0/0"]}}`, 2, func(r orchestrator.CreateRequest) bool {
			return r.Egress != nil && slices.Equal(r.Egress.AllowDomains, []string{"example.com", "*.pypi.org"}) && len(r.Egress.AllowOut) == 1
		}, false},
		{"domain in denyOut", `{"templateID":"base","network":{"denyOut":["example.com"]}}`, 2, nil, true},
		{"wildcard of a TLD", `{"templateID":"base","network":{"allowOut":["*.com"]}}`, 2, nil, true},
		{"not a domain", `{"templateID":"base","network":{"allowOut":["exa mple.com"]}}`, 2, nil, true},
		{"bad IPv4", `{"templateID":"base","network":{"allowOut":["300.1.2.3"]}}`, 2, nil, true},
		{"bad CIDR", `{"templateID":"base","network":{"denyOut":["10.0.0.0/33"]}}`, 2, nil, true},
		{"empty", ``, 2, nil, true},
		{"malformed", `{"templateID":`, 2, nil, true},
		{"not an object", `[1,2]`, 2, nil, true},
		{"no template", `{"timeout":5}`, 2, nil, true},
		{"blank template", `{"templateID":"  "}`, 2, nil, true},
		{"negative timeout", `{"templateID":"base","timeout":-1}`, 2, nil, true},
		{"huge timeout", `{"templateID":"base","timeout":99999999999}`, 2, nil, true},
		{"float timeout", `{"templateID":"base","timeout":1.5}`, 2, nil, true},
		{"metadata not strings", `{"templateID":"base","metadata":{"a":1}}`, 2, nil, true},
		{"autoResume without autoPause", `{"templateID":"base","autoResume":true}`, 2, nil, true},
		{"autoResume garbage", `{"templateID":"base","autoPause":true,"autoResume":"yes"}`, 2, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := parseNewSandbox([]byte(tc.body), tc.version)
			if tc.invalid {
				if !errors.Is(err, orchestrator.ErrInvalid) {
					t.Fatalf("got %+v, %v; want ErrInvalid", req, err)
				}
				return
			}
			if err != nil || !tc.check(req) {
				t.Fatalf("got %+v, %v", req, err)
			}
		})
	}
}

func FuzzParseNewSandbox(f *testing.F) {
	for _, s := range []string{`{"templateID":"base"}`, `{"templateID":"b","timeout":-1}`, `{"autoResume":{"enabled":true},"autoPause":true,"templateID":"x"}`, `{`, `null`, `{"network":{"allowOut":["1.2.3.4/32"]},"templateID":"t"}`} {
		f.Add([]byte(s), 2)
	}
	f.Fuzz(func(t *testing.T, body []byte, version int) {
		req, err := parseNewSandbox(body, version)
		if err != nil {
			if !errors.Is(err, orchestrator.ErrInvalid) {
				t.Fatalf("error %v is not ErrInvalid: the API would answer 500 for bad input", err)
			}
			return
		}
		if req.Template == "" || req.Timeout < 0 {
			t.Fatalf("accepted an invalid request: %+v", req)
		}
	})
}

func TestParseMetadata(t *testing.T) {
	// The SDK encodes each key and value, then the whole k=v&k2=v2 string.
	got, err := parseMetadata("user%3Did=a%26b&env=prod")
	if err != nil {
		t.Fatal(err)
	}
	if got.Get("user=id") != "a&b" || got.Get("env") != "prod" {
		t.Fatalf("parseMetadata = %v", got)
	}
	if _, err := parseMetadata("%zz"); err == nil {
		t.Fatal("bad escape accepted")
	}
}

func TestPageTokenRoundTrip(t *testing.T) {
	in := orchestrator.Info{}
	in.ID = "abcdefghij0123456789"
	in.StartedAt = time.Unix(1700000000, 123456789).UTC()
	at, id, err := parsePageToken(pageToken(in))
	if err != nil || id != in.ID || !at.Equal(in.StartedAt) {
		t.Fatalf("round trip: %v %q %v", at, id, err)
	}
	for _, bad := range []string{"", "!!!", "bm9zbGFzaA", "eC9h"} {
		if _, _, err := parsePageToken(bad); err == nil {
			t.Errorf("parsePageToken(%q) accepted", bad)
		}
	}
	later := in
	later.StartedAt = in.StartedAt.Add(time.Second)
	if !pastToken(later, in.StartedAt, in.ID, true) || pastToken(later, in.StartedAt, in.ID, false) {
		t.Fatal("pastToken order wrong")
	}
}
