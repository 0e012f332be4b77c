// Package store persists cubicle's control-plane state — API keys and sandbox
// records — in SQLite (modernc.org/sqlite, pure Go), so that nothing is lost
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
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cubicle-dev/cubicle/runtime"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// ErrNotFound is returned when a record does not exist.
var ErrNotFound = errors.New("store: not found")

// Store is a handle on the state database. It is safe for concurrent use.
type Store struct {
	db  *sql.DB
	dir string
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
`

// Open opens (creating if needed) the database in dir.
func Open(dir string) (*Store, error) {
	path := filepath.Join(dir, "cubicle.db")
	// WAL lets the API read while the reaper writes; busy_timeout absorbs the
	// short write contention between them.
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)&_pragma=synchronous(NORMAL)&_pragma=foreign_keys(1)"
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
	s := &Store{db: db, dir: dir}
	s.reserveGone.Store(true) // until made
	if err := s.ensureReserve(); err != nil && !errors.Is(err, syscall.ENOSPC) {
		db.Close()
		return nil, fmt.Errorf("store: disk-full reserve: %w", err)
	}
	return s, nil
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
	TimeoutSeconds  int               `json:"timeoutSeconds"`
	CPUCount        int               `json:"cpuCount"`
	MemoryMB        int               `json:"memoryMB"`
	DiskSizeMB      int               `json:"diskSizeMB"`
	Metadata        map[string]string `json:"metadata,omitempty"`
	EnvdAccessToken string            `json:"envdAccessToken"`
	TrafficToken    string            `json:"trafficAccessToken,omitempty"`
	AutoPause       bool              `json:"autoPause"`
	AutoResume      bool              `json:"autoResume"`
	AllowInternet   bool              `json:"allowInternetAccess"`
	Network         json.RawMessage   `json:"network,omitempty"`
	// Egress is the policy in force, parsed; nil is runtime.DefaultEgress.
	// A restarted server gives it back to the runtime (the resolver half
	// of it lives in memory only).
	Egress   *runtime.Egress `json:"egress,omitempty"`
	Addr     string          `json:"addr"`
	Runtime  string          `json:"runtime"`
	APIKeyID string          `json:"apiKeyID,omitempty"`
}

// PutSandbox inserts or replaces a sandbox record.
func (s *Store) PutSandbox(ctx context.Context, sb Sandbox) error {
	b, err := json.Marshal(sb)
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

// ListSandboxes returns every sandbox record.
func (s *Store) ListSandboxes(ctx context.Context) ([]Sandbox, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, record FROM sandboxes`)
	if err != nil {
		return nil, fmt.Errorf("store: list sandboxes: %w", err)
	}
	defer rows.Close()
	var out []Sandbox
	for rows.Next() {
		var id, rec string
		if err := rows.Scan(&id, &rec); err != nil {
			return nil, fmt.Errorf("store: scan sandbox: %w", err)
		}
		var sb Sandbox
		if err := json.Unmarshal([]byte(rec), &sb); err != nil {
			return nil, fmt.Errorf("store: decode sandbox %s: %w", id, err)
		}
		out = append(out, sb)
	}
	return out, rows.Err()
}
