//go:build linux && amd64

package snapshot

import "encoding/binary"

// writer appends little-endian values.
type writer struct{ b []byte }

func (w *writer) u16(v uint16)   { w.b = binary.LittleEndian.AppendUint16(w.b, v) }
func (w *writer) u32(v uint32)   { w.b = binary.LittleEndian.AppendUint32(w.b, v) }
func (w *writer) u64(v uint64)   { w.b = binary.LittleEndian.AppendUint64(w.b, v) }
func (w *writer) bytes(p []byte) { w.b = append(w.b, p...) }

// reader consumes little-endian values with bounds checks. After the first
// failure err is set and every further read returns zero values, so a
// decoder can read a whole record and check err once.
type reader struct {
	b   []byte
	err error
}

func (r *reader) len() int { return len(r.b) }

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = corrupt("need %d bytes, %d left", n, len(r.b))
		return nil
	}
	p := r.b[:n:n]
	r.b = r.b[n:]
	return p
}

func (r *reader) u16() uint16 {
	if p := r.take(2); p != nil {
		return binary.LittleEndian.Uint16(p)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if p := r.take(4); p != nil {
		return binary.LittleEndian.Uint32(p)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if p := r.take(8); p != nil {
		return binary.LittleEndian.Uint64(p)
	}
	return 0
}

// into fills dst from the stream.
func (r *reader) into(dst []byte) {
	if p := r.take(len(dst)); p != nil {
		copy(dst, p)
	}
}

// count reads a uint32 element count and checks it against max and
// against the bytes left (elements of elemSize bytes), so callers can
// allocate the result safely.
func (r *reader) count(max, elemSize int) int {
	n := r.u32()
	if r.err != nil {
		return 0
	}
	if uint64(n) > uint64(max) || uint64(n)*uint64(elemSize) > uint64(len(r.b)) {
		r.err = corrupt("count %d exceeds limit %d or the %d bytes left", n, max, len(r.b))
		return 0
	}
	return int(n)
}
