package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrNameTaken is returned when an owner already has a snapshot of that name.
var ErrNameTaken = errors.New("store: name taken")

// Snapshot is a saved sandbox that new sandboxes start from (E2B's
// snapshots, usable as a templateID). Its files live in the
// orchestrator's snapshot directory under its ID.
type Snapshot struct {
	ID string `json:"id"`
	// Name is the owner's name for it; "" when none was given.
	Name  string `json:"name,omitempty"`
	Owner string `json:"owner"`
	// SandboxID is the sandbox it was taken of.
	SandboxID string `json:"sandboxID"`
	// TemplateID and Alias are the template that sandbox was made from,
	// whose files the snapshot's sandboxes see under their own.
	TemplateID string `json:"templateID"`
	Alias      string `json:"alias,omitempty"`
	CPUCount   int    `json:"cpuCount"`
	MemoryMB   int    `json:"memoryMB"`
	DiskSizeMB int    `json:"diskSizeMB"`
	Runtime    string `json:"runtime"`
	// Volumes are the source's: sandboxes made from the snapshot mount
	// them too.
	Volumes []VolumeMount `json:"volumes,omitempty"`
	// EnvdAccessToken is the token envd held when it was saved: a sandbox
	// restored from it needs it to give envd a token of its own. Sealed.
	EnvdAccessToken string    `json:"-"`
	CreatedAt       time.Time `json:"createdAt"`
}

// storedSnapshot is a snapshot as written: its token sealed.
type storedSnapshot struct {
	Snapshot
	SealedToken string `json:"sealedToken,omitempty"`
}

// snapshotSealID binds a sealed token to its snapshot, apart from any
// sandbox of the same ID.
func snapshotSealID(id string) string { return "snapshot\x00" + id }

// PutSnapshot adds a snapshot; ErrNameTaken when its owner has one of that
// name.
func (s *Store) PutSnapshot(ctx context.Context, sn Snapshot) error {
	st := storedSnapshot{Snapshot: sn}
	if sn.EnvdAccessToken != "" {
		st.SealedToken = s.sealer.seal(snapshotSealID(sn.ID), []byte(sn.EnvdAccessToken))
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	_, err = s.exec(ctx, `INSERT INTO snapshots (id, owner, name, sandbox_id, created_at, record) VALUES (?, ?, ?, ?, ?, ?)`,
		sn.ID, sn.Owner, sn.Name, sn.SandboxID, sn.CreatedAt.UnixNano(), string(b))
	if err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed: snapshots.owner, snapshots.name") {
		return fmt.Errorf("%w: a snapshot named %q exists", ErrNameTaken, sn.Name)
	}
	if err != nil {
		return fmt.Errorf("store: put snapshot %s: %w", sn.ID, err)
	}
	return nil
}

// FindSnapshot returns owner's snapshot whose ID or name is ref;
// ErrNotFound if owner has none.
func (s *Store) FindSnapshot(ctx context.Context, owner, ref string) (Snapshot, error) {
	row := s.db.QueryRowContext(ctx, `SELECT id, record FROM snapshots WHERE owner = ? AND (id = ? OR (name != '' AND name = ?))
		ORDER BY id = ? DESC LIMIT 1`, owner, ref, ref, ref)
	var id, rec string
	if err := row.Scan(&id, &rec); errors.Is(err, sql.ErrNoRows) {
		return Snapshot{}, fmt.Errorf("%w: snapshot %q", ErrNotFound, ref)
	} else if err != nil {
		return Snapshot{}, fmt.Errorf("store: find snapshot %q: %w", ref, err)
	}
	return s.decodeSnapshot(id, rec)
}

// GetSnapshot returns snapshot id, whoever owns it.
func (s *Store) GetSnapshot(ctx context.Context, id string) (Snapshot, error) {
	var rec string
	err := s.db.QueryRowContext(ctx, `SELECT record FROM snapshots WHERE id = ?`, id).Scan(&rec)
	if errors.Is(err, sql.ErrNoRows) {
		return Snapshot{}, fmt.Errorf("%w: snapshot %q", ErrNotFound, id)
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("store: get snapshot %q: %w", id, err)
	}
	return s.decodeSnapshot(id, rec)
}

func (s *Store) decodeSnapshot(id, rec string) (Snapshot, error) {
	var st storedSnapshot
	if err := json.Unmarshal([]byte(rec), &st); err != nil {
		return Snapshot{}, fmt.Errorf("store: decode snapshot %s: %w", id, err)
	}
	if st.SealedToken != "" {
		plain, err := s.sealer.open(snapshotSealID(id), st.SealedToken)
		if err != nil {
			return Snapshot{}, fmt.Errorf("store: snapshot %s: %w", id, err)
		}
		st.EnvdAccessToken = string(plain)
	}
	return st.Snapshot, nil
}

// SnapshotFilter selects snapshots for ListSnapshots; empty fields match
// all.
type SnapshotFilter struct {
	Owner     string
	SandboxID string
	// Name matches the name or the ID.
	Name string
	// After is the ID of the last snapshot of the previous page.
	After string
	// Limit bounds the page; <= 0 means no bound.
	Limit int
}

// ListSnapshots returns snapshots in ID order.
func (s *Store) ListSnapshots(ctx context.Context, f SnapshotFilter) ([]Snapshot, error) {
	q := `SELECT id, record FROM snapshots WHERE id > ?`
	args := []any{f.After}
	if f.Owner != "" {
		q += ` AND owner = ?`
		args = append(args, f.Owner)
	}
	if f.SandboxID != "" {
		q += ` AND sandbox_id = ?`
		args = append(args, f.SandboxID)
	}
	if f.Name != "" {
		q += ` AND (name = ? OR id = ?)`
		args = append(args, f.Name, f.Name)
	}
	q += ` ORDER BY id`
	if f.Limit > 0 {
		q += ` LIMIT ?`
		args = append(args, f.Limit)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("store: list snapshots: %w", err)
	}
	defer rows.Close()
	var out []Snapshot
	for rows.Next() {
		var id, rec string
		if err := rows.Scan(&id, &rec); err != nil {
			return nil, fmt.Errorf("store: scan snapshot: %w", err)
		}
		sn, err := s.decodeSnapshot(id, rec)
		if err != nil {
			return nil, err
		}
		out = append(out, sn)
	}
	return out, rows.Err()
}

// DeleteSnapshot removes a snapshot record; a missing one is not an error.
func (s *Store) DeleteSnapshot(ctx context.Context, id string) error {
	if _, err := s.exec(ctx, `DELETE FROM snapshots WHERE id = ?`, id); err != nil {
		return fmt.Errorf("store: delete snapshot %s: %w", id, err)
	}
	return nil
}
