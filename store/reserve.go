package store

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
	"modernc.org/sqlite"
)

// The database must stay writable when the data directory's filesystem
// is full: a kill whose row delete fails leaves a record of a sandbox
// that is gone, until the next start reconciles it. So the store keeps
// reserveFile, reserveSize bytes allocated next to the database; a write
// that fails for lack of space deletes it and is tried once more, with
// room for SQLite's journal and pages. The reserve is made again by the
// first write that succeeds with it gone (if the space is back).
const (
	reserveFile = "cubicle.db.reserve"
	reserveSize = 8 << 20
)

// SQLite's primary result codes for a write that met a full disk.
const (
	sqliteIOErr = 10
	sqliteFull  = 13
)

// ensureReserve allocates the reserve file if it is missing.
func (s *Store) ensureReserve() error {
	path := filepath.Join(s.dir, reserveFile)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	err = unix.Fallocate(int(f.Fd()), 0, 0, reserveSize)
	if errors.Is(err, unix.EOPNOTSUPP) {
		err = f.Truncate(0) // a filesystem without fallocate: write it
		for i := 0; err == nil && i < reserveSize/(1<<20); i++ {
			_, err = f.Write(make([]byte, 1<<20))
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path) // a partial reserve would be mistaken for a whole one
		return err
	}
	s.reserveGone.Store(false)
	return nil
}

// exec runs a write, spending the reserve on it if the disk is full.
func (s *Store) exec(ctx context.Context, query string, args ...any) (sql.Result, error) {
	res, err := s.db.ExecContext(ctx, query, args...)
	if err == nil {
		if s.reserveGone.Load() {
			s.ensureReserve() // still full: the next success tries again
		}
		return res, nil
	}
	var se *sqlite.Error
	if !errors.As(err, &se) || (se.Code()&0xff != sqliteFull && se.Code()&0xff != sqliteIOErr) {
		return nil, err
	}
	if rerr := os.Remove(filepath.Join(s.dir, reserveFile)); rerr != nil {
		return nil, err // no reserve left to spend
	}
	s.reserveGone.Store(true)
	return s.db.ExecContext(ctx, query, args...)
}
