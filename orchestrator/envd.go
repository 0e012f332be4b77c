package orchestrator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"connectrpc.com/connect"

	"github.com/cubicle-dev/cubicle/client"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process/processconnect"
	"github.com/cubicle-dev/cubicle/runtime"
)

// envdClient is the host's side of the envd calls the orchestrator makes
// itself (/init, /health, /metrics); user traffic goes through the proxy.
type envdClient struct {
	http *http.Client
}

func newEnvdClient() *envdClient {
	return &envdClient{http: &http.Client{
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 2,
			IdleConnTimeout:     30 * time.Second,
		},
		Timeout: 30 * time.Second,
	}}
}

func envdURL(addr netip.Addr, path string) string {
	return "http://" + net.JoinHostPort(addr.String(), strconv.Itoa(runtime.EnvdPort)) + path
}

// accessTokenHeader carries envd's access token.
const accessTokenHeader = "X-Access-Token"

// initRequest is envd's POST /init body.
type initRequest struct {
	EnvVars        map[string]string `json:"envVars,omitempty"`
	AccessToken    string            `json:"accessToken,omitempty"`
	Timestamp      time.Time         `json:"timestamp"`
	DefaultUser    string            `json:"defaultUser,omitempty"`
	DefaultWorkdir string            `json:"defaultWorkdir,omitempty"`
}

// init sends /init. auth is the token envd already holds, if any (a
// sandbox restored from a snapshot): without it envd refuses a new one.
func (c *envdClient) init(ctx context.Context, addr netip.Addr, auth string, req initRequest) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, envdURL(addr, "/init"), bytes.NewReader(body))
	if err != nil {
		return err
	}
	hr.Header.Set("Content-Type", "application/json")
	if auth != "" {
		hr.Header.Set(accessTokenHeader, auth)
	}
	resp, err := c.http.Do(hr)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("envd /init: %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}

// waitHealthy polls envd's /health until it answers or limit passes.
func (c *envdClient) waitHealthy(ctx context.Context, addr netip.Addr, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	url := envdURL(addr, "/health")
	delay := 2 * time.Millisecond
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := c.http.Do(req)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode < 300 {
				return nil
			}
			err = fmt.Errorf("health: %s", resp.Status)
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("envd not healthy after %s: %w", limit, last)
		case <-time.After(delay):
		}
		delay = min(delay*2, 50*time.Millisecond)
	}
}

// envdMetrics is envd's GET /metrics body.
type envdMetrics struct {
	CPUCount   int     `json:"cpu_count"`
	CPUUsedPct float64 `json:"cpu_used_pct"`
	MemTotal   uint64  `json:"mem_total"`
	MemUsed    uint64  `json:"mem_used"`
	MemCache   uint64  `json:"mem_cache"`
	DiskUsed   uint64  `json:"disk_used"`
	DiskTotal  uint64  `json:"disk_total"`
}

func (c *envdClient) metrics(ctx context.Context, addr netip.Addr, token string) (envdMetrics, error) {
	var m envdMetrics
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, envdURL(addr, "/metrics"), nil)
	if err != nil {
		return m, err
	}
	req.Header.Set(accessTokenHeader, token)
	resp, err := c.http.Do(req)
	if err != nil {
		return m, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return m, fmt.Errorf("envd /metrics: %s", resp.Status)
	}
	err = json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&m)
	return m, err
}

func (c *envdClient) process(addr netip.Addr) processconnect.ProcessClient {
	return processconnect.NewProcessClient(c.http, envdURL(addr, ""))
}

// startCommand starts a template's start command in the background, as the
// sandbox's default user, and returns once envd reports it started. The
// command outlives this call: only a stream deadline would kill it.
func (c *envdClient) startCommand(ctx context.Context, addr netip.Addr, cmd string) error {
	stdin := false
	tag := "start-cmd"
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.process(addr).Start(ctx, connect.NewRequest(&process.StartRequest{
		Process: &process.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-l", "-c", cmd}},
		Tag:     &tag,
		Stdin:   &stdin,
	}))
	if err != nil {
		return fmt.Errorf("start command %q: %w", cmd, err)
	}
	defer stream.Close()
	if !stream.Receive() {
		return fmt.Errorf("start command %q: %w", cmd, stream.Err())
	}
	if stream.Msg().GetEvent().GetStart() == nil {
		return fmt.Errorf("start command %q: first event is not a start event", cmd)
	}
	return nil
}

// runCommand runs cmd to completion as the SDK does and returns its exit
// code.
func (c *envdClient) runCommand(ctx context.Context, addr netip.Addr, cmd string) (int, error) {
	return client.RunWith(ctx, c.process(addr), cmd, nil, nil)
}

// waitReady runs a template's ready command until it exits 0 or limit passes.
func (c *envdClient) waitReady(ctx context.Context, addr netip.Addr, cmd string, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for {
		code, err := c.runCommand(ctx, addr, cmd)
		if err == nil && code == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("ready command %q did not succeed within %s (last: exit %d, %v)", cmd, limit, code, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
