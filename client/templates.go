package client

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/cubicle-dev/cubicle/template/buildspec"
)

// Template is the API's Template object (GET /templates).
type Template struct {
	TemplateID string    `json:"templateID"`
	BuildID    string    `json:"buildID"`
	CPUCount   int       `json:"cpuCount"`
	MemoryMB   int       `json:"memoryMB"`
	DiskSizeMB int       `json:"diskSizeMB"`
	Public     bool      `json:"public"`
	Aliases    []string  `json:"aliases"`
	Names      []string  `json:"names"`
	CreatedAt  time.Time `json:"createdAt"`
}

// TemplateBuild is one build of a template in TemplateWithBuilds.
type TemplateBuild struct {
	BuildID    string    `json:"buildID"`
	Status     string    `json:"status"`
	CreatedAt  time.Time `json:"createdAt"`
	FinishedAt time.Time `json:"finishedAt"`
}

// TemplateWithBuilds is GET /templates/{id}: a template and its builds,
// newest first.
type TemplateWithBuilds struct {
	Template
	Builds []TemplateBuild `json:"builds"`
}

// NewBuild is POST /v3/templates's answer: a template with a build
// waiting for its steps.
type NewBuild struct {
	TemplateID string   `json:"templateID"`
	BuildID    string   `json:"buildID"`
	Names      []string `json:"names"`
}

// BuildLogEntry is one line of a build's log.
type BuildLogEntry struct {
	Timestamp time.Time `json:"timestamp"`
	Level     string    `json:"level"`
	Message   string    `json:"message"`
	Step      string    `json:"step"`
}

// BuildReason is why a build failed, and in which step ("base",
// "finalize", or a step's number from 1).
type BuildReason struct {
	Message string `json:"message"`
	Step    string `json:"step"`
}

// BuildStatus is GET /templates/{id}/builds/{buildID}/status.
type BuildStatus struct {
	Status     string          `json:"status"` // waiting, building, ready, error
	LogEntries []BuildLogEntry `json:"logEntries"`
	Reason     *BuildReason    `json:"reason"`
}

// Build statuses.
const (
	BuildWaiting  = "waiting"
	BuildBuilding = "building"
	BuildReady    = "ready"
	BuildError    = "error"
)

// CreateTemplate starts a build of the template name (new, or the
// caller's of that name); zero cpu and memory are the server's defaults.
func (c *Client) CreateTemplate(ctx context.Context, name string, cpuCount, memoryMB int) (NewBuild, error) {
	body := map[string]any{"name": name}
	if cpuCount > 0 {
		body["cpuCount"] = cpuCount
	}
	if memoryMB > 0 {
		body["memoryMB"] = memoryMB
	}
	var nb NewBuild
	_, err := c.Do(ctx, http.MethodPost, "/v3/templates", body, &nb)
	return nb, err
}

// TemplateFiles asks whether the server has a COPY step's files (by their
// hash), and where to upload them.
func (c *Client) TemplateFiles(ctx context.Context, templateID, hash string) (present bool, uploadURL string, err error) {
	var out struct {
		Present bool   `json:"present"`
		URL     string `json:"url"`
	}
	_, err = c.Do(ctx, http.MethodGet, "/templates/"+url.PathEscape(templateID)+"/files/"+url.PathEscape(hash), nil, &out)
	return out.Present, out.URL, err
}

// Upload PUTs a COPY step's tar to the URL TemplateFiles returned. The
// URL is signed: no API key goes with it, as with the SDKs.
func (c *Client) Upload(ctx context.Context, uploadURL string, body io.Reader) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, uploadURL, body)
	if err != nil {
		return err
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("upload: %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	return nil
}

// StartBuild sends the build's steps; the build runs on the server.
func (c *Client) StartBuild(ctx context.Context, templateID, buildID string, spec buildspec.Spec) error {
	_, err := c.Do(ctx, http.MethodPost, "/v2/templates/"+url.PathEscape(templateID)+"/builds/"+url.PathEscape(buildID), spec, nil)
	return err
}

// BuildStatus returns a build's status and its log entries from offset on.
func (c *Client) BuildStatus(ctx context.Context, templateID, buildID string, offset int) (BuildStatus, error) {
	var st BuildStatus
	_, err := c.Do(ctx, http.MethodGet, fmt.Sprintf("/templates/%s/builds/%s/status?logsOffset=%d&limit=1000",
		url.PathEscape(templateID), url.PathEscape(buildID), offset), nil, &st)
	return st, err
}

// Templates lists the caller's templates and the built-in ones.
func (c *Client) Templates(ctx context.Context) ([]Template, error) {
	var ts []Template
	_, err := c.Do(ctx, http.MethodGet, "/templates", nil, &ts)
	return ts, err
}

// Template returns a template, by ID or name, with its builds.
func (c *Client) Template(ctx context.Context, ref string) (TemplateWithBuilds, error) {
	var t TemplateWithBuilds
	_, err := c.Do(ctx, http.MethodGet, "/templates/"+url.PathEscape(ref), nil, &t)
	return t, err
}

// TemplateAlias resolves a template name to its ID.
func (c *Client) TemplateAlias(ctx context.Context, alias string) (string, error) {
	var out struct {
		TemplateID string `json:"templateID"`
	}
	_, err := c.Do(ctx, http.MethodGet, "/templates/aliases/"+url.PathEscape(alias), nil, &out)
	return out.TemplateID, err
}

// DeleteTemplate deletes a template (or snapshot) by ID or name.
func (c *Client) DeleteTemplate(ctx context.Context, ref string) error {
	_, err := c.Do(ctx, http.MethodDelete, "/templates/"+url.PathEscape(ref), nil, nil)
	return err
}
