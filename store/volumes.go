package store

import (
	"context"
	"crypto/subtle"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"modernc.org/sqlite"
)

// sqliteConstraintUnique is SQLITE_CONSTRAINT_UNIQUE, an extended result
// code (https://sqlite.org/rescode.html#constraint_unique).
const sqliteConstraintUnique = 2067

// Volumes: persistent directories that outlive sandboxes (E2B's /volumes).
// A row names one; its files live on the host (package volume). Each has an
// owner, as sandboxes do, and a name unique among that owner's volumes; its
// token, which authenticates the volume content API, is sealed like sandbox
// tokens are (seal.go), bound to the volume's ID.

// volumesSchema is applied at every open, after schema; idempotent.
const volumesSchema = `
CREATE TABLE IF NOT EXISTS volumes (
	id           TEXT PRIMARY KEY,
	owner        TEXT NOT NULL,
	name         TEXT NOT NULL,
	sealed_token TEXT NOT NULL,
	created_at   INTEGER NOT NULL,
	UNIQUE (owner, name)
);
`

// ErrExists is returned when a record would take a name already taken.
var ErrExists = errors.New("store: already exists")

// Volume is a stored volume.
type Volume struct {
	ID    string
	Name  string
	Owner string
	// Token authenticates requests to the volume's content; it is stored
	// sealed and given back only to the volume's owner.
	Token     string
	CreatedAt time.Time
}

// VolumeMount is a volume mounted into a sandbox, as its record keeps it.
type VolumeMount struct {
	VolumeID string `json:"volumeID"`
	Name     string `json:"name"`
	Path     string `json:"path"`
}

func volumeAD(id string) []byte { return []byte("cubicle volume token v1\x00" + id) }

// CreateVolume makes a volume named name for owner, with a fresh ID and
// token; ErrExists when the owner has one of that name.
func (s *Store) CreateVolume(ctx context.Context, owner, name string) (Volume, error) {
	v := Volume{ID: randomHex(10), Name: name, Owner: owner, Token: randomHex(24), CreatedAt: time.Now().UTC()}
	_, err := s.exec(ctx,
		`INSERT INTO volumes (id, owner, name, sealed_token, created_at) VALUES (?, ?, ?, ?, ?)`,
		v.ID, v.Owner, v.Name, s.sealer.sealFor(volumeAD(v.ID), []byte(v.Token)), v.CreatedAt.UnixNano())
	if err != nil {
		if se := (*sqlite.Error)(nil); errors.As(err, &se) && se.Code() == sqliteConstraintUnique {
			return Volume{}, fmt.Errorf("store: volume %q: %w", name, ErrExists)
		}
		return Volume{}, fmt.Errorf("store: create volume %q: %w", name, err)
	}
	return v, nil
}

const volumeColumns = `id, owner, name, sealed_token, created_at`

func (s *Store) scanVolume(row interface{ Scan(...any) error }) (Volume, error) {
	var v Volume
	var sealed string
	var created int64
	if err := row.Scan(&v.ID, &v.Owner, &v.Name, &sealed, &created); err != nil {
		return Volume{}, err
	}
	tok, err := s.sealer.openFor(volumeAD(v.ID), sealed)
	if err != nil {
		return Volume{}, fmt.Errorf("store: volume %s: %w", v.ID, err)
	}
	v.Token = string(tok)
	v.CreatedAt = time.Unix(0, created).UTC()
	return v, nil
}

// GetVolume returns the volume with the given ID, whoever owns it: the
// caller applies its own wall. ErrNotFound when there is none.
func (s *Store) GetVolume(ctx context.Context, id string) (Volume, error) {
	v, err := s.scanVolume(s.db.QueryRowContext(ctx, `SELECT `+volumeColumns+` FROM volumes WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Volume{}, ErrNotFound
	}
	return v, err
}

// VolumeByName returns owner's volume called name, or ErrNotFound.
func (s *Store) VolumeByName(ctx context.Context, owner, name string) (Volume, error) {
	v, err := s.scanVolume(s.db.QueryRowContext(ctx,
		`SELECT `+volumeColumns+` FROM volumes WHERE owner = ? AND name = ?`, owner, name))
	if errors.Is(err, sql.ErrNoRows) {
		return Volume{}, ErrNotFound
	}
	return v, err
}

// ListVolumes returns owner's volumes, oldest first.
func (s *Store) ListVolumes(ctx context.Context, owner string) ([]Volume, error) {
	rows, err := s.db.QueryContext(ctx,
		`SELECT `+volumeColumns+` FROM volumes WHERE owner = ? ORDER BY created_at, id`, owner)
	if err != nil {
		return nil, fmt.Errorf("store: list volumes: %w", err)
	}
	defer rows.Close()
	var out []Volume
	for rows.Next() {
		v, err := s.scanVolume(rows)
		if err != nil {
			return nil, fmt.Errorf("store: scan volume: %w", err)
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// DeleteVolume removes a volume's row; ErrNotFound when there is none.
func (s *Store) DeleteVolume(ctx context.Context, id string) error {
	res, err := s.exec(ctx, `DELETE FROM volumes WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("store: delete volume %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("store: volume %s: %w", id, ErrNotFound)
	}
	return nil
}

// VerifyVolumeToken returns the volume id if token is its token, and
// ErrNotFound for an unknown volume and a wrong token alike.
func (s *Store) VerifyVolumeToken(ctx context.Context, id, token string) (Volume, error) {
	v, err := s.GetVolume(ctx, id)
	if err != nil {
		return Volume{}, err
	}
	if token == "" || subtle.ConstantTimeCompare([]byte(v.Token), []byte(token)) != 1 {
		return Volume{}, ErrNotFound
	}
	return v, nil
}
