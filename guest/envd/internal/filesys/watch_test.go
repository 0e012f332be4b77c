package filesys

import (
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem"
)

func TestEventTypes(t *testing.T) {
	tests := []struct {
		mask uint32
		want []pb.EventType
	}{
		{unix.IN_CREATE, []pb.EventType{pb.EventType_EVENT_TYPE_CREATE}},
		{unix.IN_MOVED_TO | unix.IN_ISDIR, []pb.EventType{pb.EventType_EVENT_TYPE_CREATE}},
		{unix.IN_MOVED_FROM, []pb.EventType{pb.EventType_EVENT_TYPE_RENAME}},
		{unix.IN_MOVE_SELF, []pb.EventType{pb.EventType_EVENT_TYPE_RENAME}},
		{unix.IN_MODIFY, []pb.EventType{pb.EventType_EVENT_TYPE_WRITE}},
		{unix.IN_ATTRIB, []pb.EventType{pb.EventType_EVENT_TYPE_CHMOD}},
		{unix.IN_DELETE, []pb.EventType{pb.EventType_EVENT_TYPE_REMOVE}},
		{unix.IN_DELETE_SELF, []pb.EventType{pb.EventType_EVENT_TYPE_REMOVE}},
		{unix.IN_ATTRIB | unix.IN_MODIFY, []pb.EventType{pb.EventType_EVENT_TYPE_CHMOD, pb.EventType_EVENT_TYPE_WRITE}},
		{unix.IN_IGNORED, nil},
	}
	for _, tc := range tests {
		if got := eventTypes(tc.mask); !slices.Equal(got, tc.want) {
			t.Errorf("eventTypes(%#x) = %v, want %v", tc.mask, got, tc.want)
		}
	}
}
