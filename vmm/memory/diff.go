//go:build linux

package memory

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
	"math/bits"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Diff memory files. A diff memory file is as long as guest memory and
// holds only the pages that changed since its base memory file, at their
// offsets; everything else is a hole. Every page of a diff is written,
// zero pages included, so "changed to zero" stays distinguishable from
// "unchanged" (a hole). Readers find the pages with SEEK_DATA/SEEK_HOLE.
//
// Memory files are identified by their contents (ContentID), so that a
// diff names its base and can be refused on any other.

// ErrDiff is returned for a diff memory file that does not fit: wrong
// size, or more data than the pages its state file declares (a
// filesystem that does not keep holes).
var ErrDiff = errors.New("memory: diff memory file does not fit")

var crcTable = crc64.MakeTable(crc64.ECMA)

// idHash accumulates a ContentID: CRC-64/ECMA over the memory size and,
// for each non-zero page in ascending order, its offset and its bytes.
// Zero pages do not count, so a hole and a page of zeros are the same.
type idHash struct{ crc uint64 }

func newIDHash(size uint64) *idHash {
	h := &idHash{}
	h.crc = crc64.Update(0, crcTable, binary.LittleEndian.AppendUint64(nil, size))
	return h
}

func (h *idHash) page(off uint64, p []byte) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], off)
	h.crc = crc64.Update(h.crc, crcTable, b[:])
	h.crc = crc64.Update(h.crc, crcTable, p)
}

// EnableWriteTracking makes the Memory record which pages the VMM itself
// hands out (Slice) or writes (WriteAt), for diff snapshots: KVM's dirty
// log only sees the guest's writes. A page counts from the moment a slice
// of it is handed out, read or write (devices get writable aliases), which
// over-approximates but never misses a transient access. Call it before
// the memory is shared.
func (m *Memory) EnableWriteTracking() {
	m.vmmDirty = make([]atomic.Uint64, (len(m.mem)/PageSize+63)/64)
}

// markOffsets records [off, off+n) of the mapping as written by the VMM.
func (m *Memory) markOffsets(off, n uint64) {
	if m.vmmDirty == nil || n == 0 {
		return
	}
	for p := off / PageSize; p <= (off+n-1)/PageSize; p++ {
		w := &m.vmmDirty[p/64]
		bit := uint64(1) << (p % 64)
		if w.Load()&bit == 0 {
			w.Or(bit)
		}
	}
}

// MarkDirty records guest-physical [gpa, gpa+n) as written by the VMM, for
// memory a device keeps writing through a slice it obtained long ago
// (virtio used rings).
func (m *Memory) MarkDirty(gpa, n uint64) error {
	off, err := m.offset(gpa, n)
	if err != nil {
		return err
	}
	m.markOffsets(off, n)
	return nil
}

// TakeWriteLog ORs the VMM-written pages into bitmap (one bit per page of
// the mapping, as Pages words) and resets the record. Without write
// tracking it does nothing.
func (m *Memory) TakeWriteLog(bitmap []uint64) {
	for i := range m.vmmDirty {
		if i < len(bitmap) {
			bitmap[i] |= m.vmmDirty[i].Swap(0)
		}
	}
}

// BitmapWords is the length of a bitmap with one bit per page of the
// mapping.
func (m *Memory) BitmapWords() int { return (len(m.mem)/PageSize + 63) / 64 }

// offset translates a guest-physical range to an offset of the mapping.
func (m *Memory) offset(gpa, n uint64) (uint64, error) {
	for _, r := range m.regions {
		if gpa >= r.GuestAddr && gpa < r.End() && n <= r.End()-gpa {
			return r.Offset + (gpa - r.GuestAddr), nil
		}
	}
	return 0, fmt.Errorf("%w: [%#x, +%#x)", ErrRange, gpa, n)
}

// ContentID returns the identity of the current contents of guest memory
// (see FileID). The guest must not run meanwhile.
func (m *Memory) ContentID() uint64 {
	h := newIDHash(uint64(len(m.mem)))
	for off := 0; off < len(m.mem); off += PageSize {
		if p := m.mem[off : off+PageSize]; !isZero(p) {
			h.page(uint64(off), p)
		}
	}
	return h.crc
}

// DumpPages writes the pages set in bitmap (bit i: bytes i*PageSize.. of
// the mapping) to a new sparse file at path, as long as guest memory,
// atomically; the rest of the file is holes. It returns the number of
// pages written. The guest must not run meanwhile.
func (m *Memory) DumpPages(path string, bitmap []uint64) (int, error) {
	pages := 0
	err := writeAtomic(path, int64(len(m.mem)), func(f *os.File) error {
		n := uint64(len(m.mem)) / PageSize
		for p := uint64(0); p < n; {
			if !bitSet(bitmap, p) {
				p++
				continue
			}
			end := p + 1
			for end < n && bitSet(bitmap, end) {
				end++
			}
			if _, err := f.WriteAt(m.mem[p*PageSize:end*PageSize], int64(p*PageSize)); err != nil {
				return err
			}
			pages += int(end - p)
			p = end
		}
		return nil
	})
	return pages, err
}

func bitSet(bitmap []uint64, p uint64) bool {
	return p/64 < uint64(len(bitmap)) && bitmap[p/64]&(1<<(p%64)) != 0
}

// CountPages returns the number of bits set in bitmap.
func CountPages(bitmap []uint64) int {
	n := 0
	for _, w := range bitmap {
		n += bits.OnesCount64(w)
	}
	return n
}

// ApplyDiff copies the data extents of the diff memory file at path onto
// guest memory (for a mapped file: onto this process's private copy) and
// returns the pages it copied as a bitmap (BitmapWords long). maxPages is
// the number of pages the diff's state file declares; a file with more
// data is refused (ErrDiff), since a filesystem that filled the holes
// would otherwise overwrite the base with zeros. With write tracking on,
// the copied pages count as written.
func (m *Memory) ApplyDiff(path string, maxPages uint64) ([]uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("memory: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("memory: %w", err)
	}
	if st.Size() != int64(len(m.mem)) {
		return nil, fmt.Errorf("%w: %s is %d bytes, guest memory %d", ErrDiff, path, st.Size(), len(m.mem))
	}
	bitmap := make([]uint64, m.BitmapWords())
	var pages uint64
	err = extents(f, st.Size(), func(start, end int64) error {
		start &^= PageSize - 1
		end = (end + PageSize - 1) &^ (PageSize - 1)
		pages += uint64(end-start) / PageSize
		if pages > maxPages {
			return fmt.Errorf("%w: %s has more than the %d pages of data its state declares (does the filesystem keep holes?)", ErrDiff, path, maxPages)
		}
		if _, err := f.ReadAt(m.mem[start:end], start); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("memory: reading %s: %w", path, err)
		}
		for p := uint64(start) / PageSize; p < uint64(end)/PageSize; p++ {
			bitmap[p/64] |= 1 << (p % 64)
		}
		m.markOffsets(uint64(start), uint64(end-start))
		return nil
	})
	if err != nil {
		return nil, err
	}
	return bitmap, nil
}

// extents calls fn for each data extent [start, end) of f (SEEK_DATA /
// SEEK_HOLE), in ascending order.
func extents(f *os.File, size int64, fn func(start, end int64) error) error {
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // no data after off
		}
		if err != nil {
			return fmt.Errorf("memory: SEEK_DATA in %s: %w", f.Name(), err)
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("memory: SEEK_HOLE in %s: %w", f.Name(), err)
		}
		end = min(end, size)
		if err := fn(start, end); err != nil {
			return err
		}
		off = end
	}
	return nil
}

// FileID returns the ContentID of the memory file at path: CRC-64/ECMA
// over its size and every non-zero page with its offset. It reads only
// the file's data extents.
func FileID(path string) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("memory: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("memory: %w", err)
	}
	h := newIDHash(uint64(st.Size()))
	buf := make([]byte, 256*PageSize)
	err = extents(f, st.Size(), func(start, end int64) error {
		start &^= PageSize - 1
		for off := start; off < end; {
			n := min(int64(len(buf)), (end-off+PageSize-1)&^(PageSize-1))
			b := buf[:n]
			got, err := f.ReadAt(b, off)
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("memory: reading %s: %w", path, err)
			}
			clear(b[got:])
			for i := int64(0); i < n; i += PageSize {
				if p := b[i : i+PageSize]; !isZero(p) {
					h.page(uint64(off+i), p)
				}
			}
			off += n
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return h.crc, nil
}

// MergeFiles writes to outPath (atomically, sparse) the full memory file
// that base with the diff diffPath applied holds, and returns its
// ContentID. The files must be the same size.
func MergeFiles(basePath, diffPath, outPath string) (uint64, error) {
	base, err := os.Open(basePath)
	if err != nil {
		return 0, fmt.Errorf("memory: %w", err)
	}
	defer base.Close()
	diff, err := os.Open(diffPath)
	if err != nil {
		return 0, fmt.Errorf("memory: %w", err)
	}
	defer diff.Close()
	bst, err := base.Stat()
	if err != nil {
		return 0, fmt.Errorf("memory: %w", err)
	}
	dst, err := diff.Stat()
	if err != nil {
		return 0, fmt.Errorf("memory: %w", err)
	}
	if bst.Size() != dst.Size() {
		return 0, fmt.Errorf("%w: %s is %d bytes, its base %s %d", ErrDiff, diffPath, dst.Size(), basePath, bst.Size())
	}
	buf := make([]byte, 256*PageSize)
	copyExtents := func(out, in *os.File) error {
		return extents(in, bst.Size(), func(start, end int64) error {
			for off := start; off < end; {
				b := buf[:min(int64(len(buf)), end-off)]
				if _, err := in.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
					return err
				}
				if _, err := out.WriteAt(b, off); err != nil {
					return err
				}
				off += int64(len(b))
			}
			return nil
		})
	}
	err = writeAtomic(outPath, bst.Size(), func(out *os.File) error {
		if err := copyExtents(out, base); err != nil {
			return err
		}
		return copyExtents(out, diff)
	})
	if err != nil {
		return 0, err
	}
	return FileID(outPath)
}

// writeAtomic creates a file of size bytes (all holes) in path's
// directory, lets fill write it, and renames it to path.
func writeAtomic(path string, size int64, fill func(*os.File) error) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("memory: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
			err = fmt.Errorf("memory: writing %s: %w", path, err)
		}
	}()
	if err := tmp.Truncate(size); err != nil {
		return err
	}
	if err := fill(tmp); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// AllocatedBytes returns the disk space a file takes (st_blocks × 512).
func AllocatedBytes(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
