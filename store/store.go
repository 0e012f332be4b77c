// Package store persists cubicle's control-plane state — API keys, sandbox
// records and sandboxes' lifecycle events — in SQLite (modernc.org/sqlite, pure Go), so that nothing is lost
// when `cubicle serve` restarts.
package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cubicle-dev/cubicle/network/egress"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// ErrNotFound is returned when a record does not exist.
var ErrNotFound = errors.New("store: not found")

// Store is a handle on the state database. It is safe for concurrent use.
type Store struct {
	db     *sql.DB
	sealer *sealer
	dir    string
	// reserveGone says the disk-full reserve was spent (reserve.go).
	reserveGone atomic.Bool
}

// schema is applied at every open; statements are idempotent.
const schema = `
CREATE TABLE IF NOT EXISTS api_keys (
	id          TEXT PRIMARY KEY,
	name        TEXT NOT NULL,
	hash        TEXT NOT NULL UNIQUE,
	mask        TEXT NOT NULL,
	created_at  INTEGER NOT NULL,
	revoked_at  INTEGER
);
CREATE TABLE IF NOT EXISTS sandboxes (
	id          TEXT PRIMARY KEY,
	record      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
	id          INTEGER PRIMARY KEY AUTOINCREMENT,
	sandbox_id  TEXT NOT NULL,
	template_id TEXT NOT NULL,
	owner       TEXT NOT NULL,
	type        TEXT NOT NULL,
	reason      TEXT NOT NULL,
	at          INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_sandbox ON events (sandbox_id, id);
CREATE TABLE IF NOT EXISTS snapshots (
	id          TEXT PRIMARY KEY,
	owner       TEXT NOT NULL,
	name        TEXT NOT NULL,
	sandbox_id  TEXT NOT NULL,
	created_at  INTEGER NOT NULL,
	record      TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS snapshots_by_name ON snapshots (owner, name) WHERE name != '';
`

// fileMode is the mode of the database and its -wal and -shm files: they
// hold API key hashes and envd access tokens, for root's eyes only.
const fileMode = 0o600

// Open opens (creating if needed) the database in dir, and the key that
// seals sandbox tokens in it (see seal.go). Records written by earlier
// versions, with their tokens in clear, are sealed on the way. The database
// is made 0600, and one that an older version left readable to others is
// made so again (SQLite gives the -wal and -shm files the database's mode
// when it makes them; existing ones are tightened here too).
func Open(dir string) (*Store, error) {
	sl, err := loadSealer(dir)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "cubicle.db")
	if err := private(path); err != nil {
		return nil, err
	}
	// WAL lets the API read while the reaper writes; busy_timeout absorbs the
	// short write contention between them. secure_delete zeroes what a
	// write replaces, so that no earlier version of a record (a token in
	// clear, before sealing) lingers in the file's free space.
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)&_pragma=synchronous(NORMAL)&_pragma=foreign_keys(1)&_pragma=secure_delete(ON)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	// SQLite has one writer; a single connection avoids SQLITE_BUSY storms.
	db.SetMaxOpenConns(1)
	if _, err := db.Exec(schema); err != nil {
		db.Close()
		return nil, fmt.Errorf("store: apply schema to %s: %w", path, err)
	}
	if _, err := db.Exec(volumesSchema); err != nil {
		db.Close()
		return nil, fmt.Errorf("store: apply volumes schema to %s: %w", path, err)
	}
	st := &Store{db: db, sealer: sl, dir: dir}
	st.reserveGone.Store(true) // until made
	if err := st.ensureReserve(); err != nil && !errors.Is(err, syscall.ENOSPC) {
		db.Close()
		return nil, fmt.Errorf("store: disk-full reserve: %w", err)
	}
	if err := st.sealLegacy(context.Background()); err != nil {
		db.Close()
		return nil, err
	}
	return st, nil
}

// sealLegacy rewrites the records that hold tokens in clear (written
// before tokens were sealed), and checks that every sealed one opens with
// this key: a wrong key is reported now, not at the first restart's
// reconciliation.
func (s *Store) sealLegacy(ctx context.Context) error {
	rows, err := s.sandboxRows(ctx)
	if err != nil {
		return err
	}
	rewrote := false
	for _, r := range rows {
		sb, legacy, err := s.decode(r.id, r.rec)
		if err != nil {
			return err
		}
		if legacy {
			if err := s.PutSandbox(ctx, sb); err != nil {
				return err
			}
			rewrote = true
		}
	}
	if rewrote {
		// The replaced versions are in the write-ahead log too.
		if _, err := s.db.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
			return fmt.Errorf("store: checkpoint after sealing tokens: %w", err)
		}
	}
	return nil
}

// private creates path with fileMode if it is missing, and takes the
// group's and others' access away from it and its -wal and -shm files.
func private(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, fileMode)
	if err != nil {
		return fmt.Errorf("store: open %s: %w", path, err)
	}
	f.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		fi, err := os.Stat(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("store: %w", err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			if err := os.Chmod(p, fi.Mode().Perm()&fileMode); err != nil {
				return fmt.Errorf("store: make %s private: %w", p, err)
			}
		}
	}
	return nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// APIKey is a stored API key; the secret itself is never stored, only its hash.
type APIKey struct {
	ID        string     `json:"id"`
	Name      string     `json:"name"`
	Mask      string     `json:"mask"`
	CreatedAt time.Time  `json:"createdAt"`
	RevokedAt *time.Time `json:"revokedAt,omitempty"`
}

// KeyPrefix starts every API key, as the E2B SDK demands (^e2b_[0-9a-f]+$).
const KeyPrefix = "e2b_"

func hashKey(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand failed: " + err.Error()) // cannot happen on Linux ≥ 3.17
	}
	return hex.EncodeToString(b)
}

// CreateAPIKey makes a new key and returns it with its secret, which is shown
// once and never stored.
func (s *Store) CreateAPIKey(ctx context.Context, name string) (APIKey, string, error) {
	secret := KeyPrefix + randomHex(20)
	k := APIKey{
		ID:        randomHex(8),
		Name:      name,
		Mask:      secret[:len(KeyPrefix)+4] + "…" + secret[len(secret)-4:],
		CreatedAt: time.Now().UTC(),
	}
	_, err := s.db.ExecContext(ctx,
		`INSERT INTO api_keys (id, name, hash, mask, created_at) VALUES (?, ?, ?, ?, ?)`,
		k.ID, k.Name, hashKey(secret), k.Mask, k.CreatedAt.UnixNano())
	if err != nil {
		return APIKey{}, "", fmt.Errorf("store: create api key: %w", err)
	}
	return k, secret, nil
}

// ListAPIKeys returns every key, revoked ones included.
func (s *Store) ListAPIKeys(ctx context.Context) ([]APIKey, error) {
	rows, err := s.db.QueryContext(ctx,
		`SELECT id, name, mask, created_at, revoked_at FROM api_keys ORDER BY created_at`)
	if err != nil {
		return nil, fmt.Errorf("store: list api keys: %w", err)
	}
	defer rows.Close()
	var keys []APIKey
	for rows.Next() {
		var k APIKey
		var created int64
		var revoked sql.NullInt64
		if err := rows.Scan(&k.ID, &k.Name, &k.Mask, &created, &revoked); err != nil {
			return nil, fmt.Errorf("store: scan api key: %w", err)
		}
		k.CreatedAt = time.Unix(0, created).UTC()
		k.RevokedAt = nullTime(revoked)
		keys = append(keys, k)
	}
	return keys, rows.Err()
}

func nullTime(v sql.NullInt64) *time.Time {
	if !v.Valid {
		return nil
	}
	t := time.Unix(0, v.Int64).UTC()
	return &t
}

// RevokeAPIKey revokes the key with the given ID.
func (s *Store) RevokeAPIKey(ctx context.Context, id string) error {
	res, err := s.db.ExecContext(ctx,
		`UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL`, time.Now().UnixNano(), id)
	if err != nil {
		return fmt.Errorf("store: revoke api key %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("store: api key %s: %w", id, ErrNotFound)
	}
	return nil
}

// CountActiveAPIKeys reports how many unrevoked keys exist.
func (s *Store) CountActiveAPIKeys(ctx context.Context) (int, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM api_keys WHERE revoked_at IS NULL`).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("store: count api keys: %w", err)
	}
	return n, nil
}

// VerifyAPIKey reports whether secret is a valid, unrevoked key.
func (s *Store) VerifyAPIKey(ctx context.Context, secret string) (APIKey, error) {
	h := hashKey(secret)
	var k APIKey
	var hash string
	var created int64
	err := s.db.QueryRowContext(ctx,
		`SELECT id, name, mask, hash, created_at FROM api_keys WHERE hash = ? AND revoked_at IS NULL`, h).
		Scan(&k.ID, &k.Name, &k.Mask, &hash, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return APIKey{}, ErrNotFound
	}
	if err != nil {
		return APIKey{}, fmt.Errorf("store: verify api key: %w", err)
	}
	// The lookup is by hash already; the constant-time compare keeps the
	// check honest should the query ever change to a prefix match.
	if subtle.ConstantTimeCompare([]byte(hash), []byte(h)) != 1 {
		return APIKey{}, ErrNotFound
	}
	k.CreatedAt = time.Unix(0, created).UTC()
	return k, nil
}

// Sandbox is the persisted record of one sandbox. It is stored as JSON so
// that fields can be added without migrations.
type Sandbox struct {
	ID         string    `json:"id"`
	TemplateID string    `json:"templateID"`
	Alias      string    `json:"alias,omitempty"`
	State      string    `json:"state"`
	StartedAt  time.Time `json:"startedAt"`
	EndAt      time.Time `json:"endAt"`
	// TimeoutSeconds is the timeout the sandbox was created with; traffic
	// that wakes an auto-resume sandbox gives it this long again.
	TimeoutSeconds int               `json:"timeoutSeconds"`
	CPUCount       int               `json:"cpuCount"`
	MemoryMB       int               `json:"memoryMB"`
	DiskSizeMB     int               `json:"diskSizeMB"`
	Metadata       map[string]string `json:"metadata,omitempty"`
	// The tokens are never written in clear: PutSandbox seals them.
	EnvdAccessToken string          `json:"envdAccessToken,omitempty"`
	TrafficToken    string          `json:"trafficAccessToken,omitempty"`
	AutoPause       bool            `json:"autoPause"`
	AutoResume      bool            `json:"autoResume"`
	AllowInternet   bool            `json:"allowInternetAccess"`
	Network         json.RawMessage `json:"network,omitempty"`
	// Egress is the policy in force, parsed; nil is egress.Default. A
	// restarted server applies it again (the resolver half of it lives in
	// memory only). Its JSON form is the one runtime.Egress had, where
	// the type lived before: records written then read back unchanged.
	Egress  *egress.Policy `json:"egress,omitempty"`
	Addr    string         `json:"addr"`
	Runtime string         `json:"runtime"`
	// APIKeyID is the key that created the sandbox; Owner is who may see
	// and use it (the key today, its team once keys have teams). Records
	// written before owners existed are owned by their key.
	APIKeyID string `json:"apiKeyID,omitempty"`
	Owner    string `json:"owner,omitempty"`
	// BaseTemplate, for a sandbox made from a snapshot (TemplateID), is
	// the template whose files it sees under its own.
	BaseTemplate string `json:"baseTemplate,omitempty"`
	// EnvVars are the create request's; sealed like the tokens.
	EnvVars map[string]string `json:"-"`
	// PausedOnDisk says how a paused sandbox was saved: PausedMemory or
	// PausedFilesystem (written to disk; nothing of it runs), or "" (frozen in
	// place, or running).
	PausedOnDisk string `json:"pausedOnDisk,omitempty"`
	// AutoPauseFilesOnly makes a timeout's pause (AutoPause) keep only
	// the sandbox's files (E2B's onTimeout keepMemory false).
	AutoPauseFilesOnly bool `json:"autoPauseFilesOnly,omitempty"`
	// Volumes are the owner's volumes mounted into the sandbox (volumes.go).
	Volumes []VolumeMount `json:"volumes,omitempty"`
}

// How a sandbox paused to disk was saved (Sandbox.PausedOnDisk).
const (
	// PausedMemory: processes, memory and files; a resume continues them.
	PausedMemory = "memory"
	// PausedFilesystem: files only; a resume boots the sandbox afresh.
	PausedFilesystem = "filesystem"
)

// storedSandbox is a record as written: its tokens sealed, none in clear.
type storedSandbox struct {
	Sandbox
	SealedTokens string `json:"sealedTokens,omitempty"`
}

func (s *Store) encode(sb Sandbox) ([]byte, error) {
	st := storedSandbox{Sandbox: sb}
	if sb.EnvdAccessToken != "" || sb.TrafficToken != "" || len(sb.EnvVars) > 0 {
		plain, err := json.Marshal(sealedTokens{Envd: sb.EnvdAccessToken, Traffic: sb.TrafficToken, Env: sb.EnvVars})
		if err != nil {
			return nil, err
		}
		st.SealedTokens = s.sealer.seal(sb.ID, plain)
		st.EnvdAccessToken, st.TrafficToken = "", ""
	}
	return json.Marshal(st)
}

// decode reads a stored record; legacy reports tokens found in clear.
func (s *Store) decode(id, rec string) (sb Sandbox, legacy bool, err error) {
	var st storedSandbox
	if err := json.Unmarshal([]byte(rec), &st); err != nil {
		return Sandbox{}, false, fmt.Errorf("store: decode sandbox %s: %w", id, err)
	}
	sb = st.Sandbox
	legacy = sb.EnvdAccessToken != "" || sb.TrafficToken != ""
	if st.SealedTokens != "" {
		plain, err := s.sealer.open(sb.ID, st.SealedTokens)
		if err != nil {
			return Sandbox{}, false, fmt.Errorf("store: sandbox %s: %w", id, err)
		}
		var t sealedTokens
		if err := json.Unmarshal(plain, &t); err != nil {
			return Sandbox{}, false, fmt.Errorf("store: sandbox %s: sealed tokens: %w", id, err)
		}
		sb.EnvdAccessToken, sb.TrafficToken, sb.EnvVars = t.Envd, t.Traffic, t.Env
	}
	if sb.Owner == "" {
		sb.Owner = sb.APIKeyID
	}
	return sb, legacy, nil
}

// PutSandbox inserts or replaces a sandbox record.
func (s *Store) PutSandbox(ctx context.Context, sb Sandbox) error {
	b, err := s.encode(sb)
	if err != nil {
		return fmt.Errorf("store: encode sandbox %s: %w", sb.ID, err)
	}
	_, err = s.exec(ctx,
		`INSERT INTO sandboxes (id, record) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET record = excluded.record`,
		sb.ID, string(b))
	if err != nil {
		return fmt.Errorf("store: put sandbox %s: %w", sb.ID, err)
	}
	return nil
}

// DeleteSandbox removes a sandbox record; deleting a missing one is not an error.
func (s *Store) DeleteSandbox(ctx context.Context, id string) error {
	if _, err := s.exec(ctx, `DELETE FROM sandboxes WHERE id = ?`, id); err != nil {
		return fmt.Errorf("store: delete sandbox %s: %w", id, err)
	}
	return nil
}

type sandboxRow struct{ id, rec string }

func (s *Store) sandboxRows(ctx context.Context) ([]sandboxRow, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, record FROM sandboxes`)
	if err != nil {
		return nil, fmt.Errorf("store: list sandboxes: %w", err)
	}
	defer rows.Close()
	var out []sandboxRow
	for rows.Next() {
		var r sandboxRow
		if err := rows.Scan(&r.id, &r.rec); err != nil {
			return nil, fmt.Errorf("store: scan sandbox: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// Event types: how a sandbox ended.
const (
	// EventKilled: a client killed it (Reason EventReasonRequest) or its
	// timeout ran out (EventReasonTimeout).
	EventKilled = "killed"
	// EventDied: it stopped on its own; Reason says why ("oom", "exited",
	// "unresponsive").
	EventDied = "died"
)

// Reasons of EventKilled.
const (
	EventReasonRequest = "request"
	EventReasonTimeout = "timeout"
)

// Event is one lifecycle event of a sandbox. The template and the owner
// are copied from the sandbox's record, which is gone once it ended, so
// that events can be shown to their owner only.
type Event struct {
	ID         int64     `json:"id"`
	SandboxID  string    `json:"sandboxID"`
	TemplateID string    `json:"templateID"`
	Owner      string    `json:"owner,omitempty"`
	Type       string    `json:"type"`
	Reason     string    `json:"reason,omitempty"`
	Time       time.Time `json:"timestamp"`
}

// AddEvent appends an event; its ID and, when zero, its Time are set here.
func (s *Store) AddEvent(ctx context.Context, e Event) (Event, error) {
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	res, err := s.db.ExecContext(ctx,
		`INSERT INTO events (sandbox_id, template_id, owner, type, reason, at) VALUES (?, ?, ?, ?, ?, ?)`,
		e.SandboxID, e.TemplateID, e.Owner, e.Type, e.Reason, e.Time.UnixNano())
	if err != nil {
		return e, fmt.Errorf("store: add %s event of sandbox %s: %w", e.Type, e.SandboxID, err)
	}
	e.ID, _ = res.LastInsertId()
	return e, nil
}

// ListEvents returns events oldest first: those of sandboxID, or of every
// sandbox when it is empty, with an ID above after, at most limit of them
// (no limit when limit <= 0).
func (s *Store) ListEvents(ctx context.Context, sandboxID string, after int64, limit int) ([]Event, error) {
	q := `SELECT id, sandbox_id, template_id, owner, type, reason, at FROM events WHERE id > ?`
	args := []any{after}
	if sandboxID != "" {
		q += ` AND sandbox_id = ?`
		args = append(args, sandboxID)
	}
	q += ` ORDER BY id`
	if limit > 0 {
		q += ` LIMIT ?`
		args = append(args, limit)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("store: list events: %w", err)
	}
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var e Event
		var at int64
		if err := rows.Scan(&e.ID, &e.SandboxID, &e.TemplateID, &e.Owner, &e.Type, &e.Reason, &at); err != nil {
			return nil, fmt.Errorf("store: scan event: %w", err)
		}
		e.Time = time.Unix(0, at).UTC()
		out = append(out, e)
	}
	return out, rows.Err()
}

// ListSandboxes returns every sandbox record.
func (s *Store) ListSandboxes(ctx context.Context) ([]Sandbox, error) {
	rows, err := s.sandboxRows(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Sandbox, 0, len(rows))
	for _, r := range rows {
		sb, _, err := s.decode(r.id, r.rec)
		if err != nil {
			return nil, err
		}
		out = append(out, sb)
	}
	return out, nil
}
