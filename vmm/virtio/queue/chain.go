package queue

// Readable returns the chain's device-readable descriptors.
func (c *Chain) Readable() []Desc { return c.Descs[:c.nRead] }

// Writable returns the chain's device-writable descriptors.
func (c *Chain) Writable() []Desc { return c.Descs[c.nRead:] }

// ReadableLen returns the total length of the readable descriptors.
func (c *Chain) ReadableLen() uint64 { return totalLen(c.Readable()) }

// WritableLen returns the total length of the writable descriptors.
func (c *Chain) WritableLen() uint64 { return totalLen(c.Writable()) }

func totalLen(ds []Desc) uint64 {
	var n uint64
	for i := range ds {
		n += uint64(len(ds[i].Buf))
	}
	return n
}

// ReadAt copies from the readable part of the chain, seen as one byte stream,
// starting at off, into p. It returns the number of bytes copied, which is
// less than len(p) only when the stream ends.
func (c *Chain) ReadAt(p []byte, off uint64) int {
	n := 0
	for _, d := range c.Readable() {
		if len(p) == n {
			break
		}
		l := uint64(len(d.Buf))
		if off >= l {
			off -= l
			continue
		}
		n += copy(p[n:], d.Buf[off:])
		off = 0
	}
	return n
}

// WriteAt copies p into the writable part of the chain, seen as one byte
// stream, starting at off. It returns the number of bytes copied, which is
// less than len(p) only when the stream ends.
func (c *Chain) WriteAt(p []byte, off uint64) int {
	n := 0
	for _, d := range c.Writable() {
		if len(p) == n {
			break
		}
		l := uint64(len(d.Buf))
		if off >= l {
			off -= l
			continue
		}
		n += copy(d.Buf[off:], p[n:])
		off = 0
	}
	return n
}

// ReadableIovecs appends to dst the guest memory of readable stream bytes
// [off, off+n), clipped to the stream's end, for vectored I/O.
func (c *Chain) ReadableIovecs(dst [][]byte, off, n uint64) [][]byte {
	return iovecs(dst, c.Readable(), off, n)
}

// WritableIovecs appends to dst the guest memory of writable stream bytes
// [off, off+n), clipped to the stream's end, for vectored I/O.
func (c *Chain) WritableIovecs(dst [][]byte, off, n uint64) [][]byte {
	return iovecs(dst, c.Writable(), off, n)
}

func iovecs(dst [][]byte, ds []Desc, off, n uint64) [][]byte {
	for _, d := range ds {
		if n == 0 {
			break
		}
		l := uint64(len(d.Buf))
		if off >= l {
			off -= l
			continue
		}
		b := d.Buf[off:]
		if uint64(len(b)) > n {
			b = b[:n]
		}
		if len(b) > 0 {
			dst = append(dst, b)
		}
		n -= uint64(len(b))
		off = 0
	}
	return dst
}
