package processes

import (
	"sync"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/process"
)

// subscriberBuffer is how many output chunks a subscriber may lag behind before the
// process's output readers wait for it. With 32 KiB chunks that bounds what one
// stream holds at 512 KiB; beyond it the pipe fills and the process blocks on write,
// which is the backpressure that keeps a flooding command from exhausting memory.
const subscriberBuffer = 16

// fanout delivers one process's output to every stream watching it (the Start stream
// and any number of Connect streams) and then the end event.
type fanout struct {
	mu   sync.Mutex // guards subs
	subs map[*subscriber]struct{}

	// done is closed by finish once every output chunk has been published; end is
	// written before done is closed and only read after, so it needs no lock.
	done chan struct{}
	end  *pb.ProcessEvent_EndEvent
}

// subscriber is one stream's view of a process's output.
type subscriber struct {
	ch   chan *pb.ProcessEvent // output events, bounded (see subscriberBuffer)
	gone chan struct{}         // closed when the stream stops listening
}

func newFanout() *fanout {
	return &fanout{subs: map[*subscriber]struct{}{}, done: make(chan struct{})}
}

// subscribe registers a new listener. It sees all output published from now on, and
// the end event (through done/end) even when it subscribes after the process ended.
func (f *fanout) subscribe() *subscriber {
	s := &subscriber{ch: make(chan *pb.ProcessEvent, subscriberBuffer), gone: make(chan struct{})}
	f.mu.Lock()
	f.subs[s] = struct{}{}
	f.mu.Unlock()
	return s
}

// unsubscribe removes s; a publish blocked on s moves on.
func (f *fanout) unsubscribe(s *subscriber) {
	f.mu.Lock()
	delete(f.subs, s)
	f.mu.Unlock()
	close(s.gone)
}

// publish hands ev to every current subscriber, waiting for each one that is behind.
// With no subscribers the output is dropped: nobody asked for it, and keeping it
// would cost unbounded memory.
func (f *fanout) publish(ev *pb.ProcessEvent) {
	f.mu.Lock()
	subs := make([]*subscriber, 0, len(f.subs))
	for s := range f.subs {
		subs = append(subs, s)
	}
	f.mu.Unlock()
	for _, s := range subs {
		select {
		case s.ch <- ev:
		case <-s.gone:
		}
	}
}

// finish records the end event. It must be called once, after the last publish has
// returned, so that a subscriber who sees done has all output already in its channel.
func (f *fanout) finish(end *pb.ProcessEvent_EndEvent) {
	f.end = end
	close(f.done)
}
