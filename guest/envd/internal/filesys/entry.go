package filesys

import (
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/fsutil"
)

// names caches uid/gid → name lookups for one request: a ListDir of a thousand
// entries would otherwise parse /etc/passwd and /etc/group two thousand times.
// Not safe for concurrent use.
type names struct {
	users  map[uint32]string
	groups map[uint32]string
}

func newNames() *names {
	return &names{users: map[uint32]string{}, groups: map[uint32]string{}}
}

// user returns the user name for uid, or the number when it has no name.
func (n *names) user(uid uint32) string {
	if s, ok := n.users[uid]; ok {
		return s
	}
	s := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(s); err == nil {
		s = u.Username
	}
	n.users[uid] = s
	return s
}

// group returns the group name for gid, or the number when it has no name.
func (n *names) group(gid uint32) string {
	if s, ok := n.groups[gid]; ok {
		return s
	}
	s := strconv.FormatUint(uint64(gid), 10)
	if g, err := user.LookupGroupId(s); err == nil {
		s = g.Name
	}
	n.groups[gid] = s
	return s
}

// stat describes the entry at path without following a final symlink.
func stat(path string, n *names) (*pb.EntryInfo, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	return entry(path, fi, n), nil
}

// entry builds an EntryInfo from lstat information. A symlink reports its target's
// type and permission bits, with symlink_target set, so that a link to a directory
// lists as a directory (as E2B's envd does); a dangling link reports FILE_TYPE_SYMLINK.
func entry(path string, fi fs.FileInfo, n *names) *pb.EntryInfo {
	mode := fi.Mode()
	e := &pb.EntryInfo{
		Name:         fi.Name(),
		Type:         fileType(mode),
		Path:         path,
		Size:         fi.Size(),
		Mode:         uint32(mode.Perm()),
		Permissions:  mode.String(),
		ModifiedTime: timestamppb.New(fi.ModTime()),
		Metadata:     fsutil.ReadMetadata(path),
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		e.Owner = n.user(st.Uid)
		e.Group = n.group(st.Gid)
	}
	if mode&fs.ModeSymlink != 0 {
		target, err := filepath.EvalSymlinks(path)
		if err != nil {
			// Dangling or looping: report where it points, unresolved.
			target, _ = os.Readlink(path)
		}
		e.SymlinkTarget = &target
		e.Type = pb.FileType_FILE_TYPE_SYMLINK
		if tfi, err := os.Stat(path); err == nil {
			if t := fileType(tfi.Mode()); t != pb.FileType_FILE_TYPE_UNSPECIFIED {
				e.Type = t
			}
			e.Mode = uint32(tfi.Mode().Perm())
		}
	}
	return e
}

// fileType maps a mode to the protocol's file types. Devices, sockets and pipes
// have no protocol type and come back unspecified (the SDK skips them in listings).
func fileType(m fs.FileMode) pb.FileType {
	switch {
	case m.IsRegular():
		return pb.FileType_FILE_TYPE_FILE
	case m.IsDir():
		return pb.FileType_FILE_TYPE_DIRECTORY
	case m&fs.ModeSymlink != 0:
		return pb.FileType_FILE_TYPE_SYMLINK
	}
	return pb.FileType_FILE_TYPE_UNSPECIFIED
}
