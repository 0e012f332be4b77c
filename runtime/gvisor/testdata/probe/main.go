// Command probe stands in for envd in the gvisor runtime's tests: a static
// binary that serves HTTP on the envd port and exposes small probes that let
// a test observe, from the host, what a sandbox can see and do.
package main

import (
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ballast holds memory allocated by /alloc so that it stays resident.
var ballast [][]byte

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-exit" {
		return // a /bin/true, for timing a bare `runsc run`
	}
	if len(os.Args) > 3 && os.Args[1] == "-once" {
		// As a RunOnce command: write Args[3] to the file Args[2], say
		// so on stdout and stderr with the uid, and exit 3 if asked.
		if err := os.WriteFile(os.Args[2], []byte(os.Args[3]), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Printf("wrote %s as %d\n", os.Args[2], os.Getuid())
		fmt.Fprintf(os.Stderr, "cwd %s env %s\n", must(os.Getwd()), os.Getenv("STEP"))
		if len(os.Args) > 4 && os.Args[4] == "fail" {
			os.Exit(3)
		}
		if len(os.Args) > 4 && os.Args[4] == "hang" {
			time.Sleep(time.Hour)
		}
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "-euid" {
		// As a setuid copy: print the effective uid it runs with.
		fmt.Print(os.Geteuid())
		return
	}
	var ticks atomic.Int64
	go func() {
		// A counter that advances only while the sandbox runs: a frozen
		// sandbox shows no progress however long it is frozen.
		for {
			time.Sleep(10 * time.Millisecond)
			ticks.Add(1)
		}
	}()

	// memo is state held only in the probe's memory: a snapshot that
	// restores the process keeps it; a fresh start loses it.
	var memo atomic.Value
	memo.Store("")

	mux := http.NewServeMux()
	mux.HandleFunc("/memo", func(w http.ResponseWriter, r *http.Request) {
		if v := r.URL.Query().Get("set"); v != "" {
			memo.Store(v)
		}
		fmt.Fprint(w, memo.Load())
	})
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("/counter", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, ticks.Load())
	})
	mux.HandleFunc("/write", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		path := q.Get("path")
		size, _ := strconv.Atoi(q.Get("size"))
		data := []byte(q.Get("data"))
		if size > 0 {
			data = make([]byte, size)
			for i := range data {
				data[i] = byte(i)
			}
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if err := os.WriteFile(path, data, 0o644); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if name := q.Get("xattr"); name != "" {
			if err := unix.Setxattr(path, name, []byte(q.Get("value")), 0); err != nil {
				http.Error(w, "setxattr: "+err.Error(), http.StatusInternalServerError)
				return
			}
		}
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("/dd", func(w http.ResponseWriter, r *http.Request) {
		// dd if=/dev/urandom of=path bs=1M count=mb conv=fsync: the error,
		// if any, of the write, fsync or close that failed; the sentry may
		// hold written pages and only meet the host's error at the flush.
		q := r.URL.Query()
		mb, _ := strconv.Atoi(q.Get("mb"))
		n, err := fill(q.Get("path"), mb)
		if err != nil {
			http.Error(w, fmt.Sprintf("after %d MiB: %v", n, err), http.StatusInsufficientStorage)
			return
		}
		fmt.Fprintf(w, "%d MiB", n)
	})
	mux.HandleFunc("/remove", func(w http.ResponseWriter, r *http.Request) {
		if err := os.Remove(r.URL.Query().Get("path")); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("/read", func(w http.ResponseWriter, r *http.Request) {
		data, err := os.ReadFile(r.URL.Query().Get("path"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		w.Write(data)
	})
	mux.HandleFunc("/getxattr", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		buf := make([]byte, 4096)
		n, err := unix.Getxattr(q.Get("path"), q.Get("name"), buf)
		if err != nil {
			http.Error(w, "getxattr: "+err.Error(), http.StatusNotFound)
			return
		}
		w.Write(buf[:n])
	})
	mux.HandleFunc("/info", func(w http.ResponseWriter, r *http.Request) {
		host, _ := os.Hostname()
		wd, _ := os.Getwd()
		var pids []int
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			if pid, err := strconv.Atoi(e.Name()); err == nil {
				pids = append(pids, pid)
			}
		}
		json.NewEncoder(w).Encode(map[string]any{
			"hostname": host, "pid": os.Getpid(), "uid": os.Getuid(),
			"cwd": wd, "args": os.Args, "pids": pids,
		})
	})
	mux.HandleFunc("/alloc", func(w http.ResponseWriter, r *http.Request) {
		mb, _ := strconv.Atoi(r.URL.Query().Get("mb"))
		for i := 0; i < mb; i++ {
			b := make([]byte, 1<<20)
			for j := 0; j < len(b); j += 4096 {
				b[j] = 1
			}
			ballast = append(ballast, b)
		}
		fmt.Fprint(w, len(ballast))
	})
	mux.HandleFunc("/print", func(w http.ResponseWriter, r *http.Request) {
		// Lines to stdout and stderr, to check that envd's output is kept.
		msg := r.URL.Query().Get("msg")
		fmt.Fprintln(os.Stdout, "stdout: "+msg)
		fmt.Fprintln(os.Stderr, "stderr: "+msg)
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("/pty", func(w http.ResponseWriter, r *http.Request) {
		// Allocate a pseudo-terminal as envd's process API does and pass
		// a line through it.
		name, err := ptyRoundTrip()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, name)
	})
	mux.HandleFunc("/exec-as", func(w http.ResponseWriter, r *http.Request) {
		// Run path with args as uid/gid (what envd does for user "user"):
		// its combined output, or the error.
		q := r.URL.Query()
		uid, _ := strconv.Atoi(q.Get("uid"))
		cmd := exec.Command(q.Get("path"), q["arg"]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
		cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
		out, err := cmd.CombinedOutput()
		if err != nil {
			http.Error(w, fmt.Sprintf("%v: %s", err, out), http.StatusInternalServerError)
			return
		}
		w.Write(out)
	})
	mux.HandleFunc("/sleep", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		time.Sleep(time.Duration(ms) * time.Millisecond)
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("/exit", func(w http.ResponseWriter, r *http.Request) {
		// The sandbox's first process ends, as a crashed envd does.
		os.Exit(3)
	})
	mux.HandleFunc("/statfs", func(w http.ResponseWriter, r *http.Request) {
		var st unix.Statfs_t
		if err := unix.Statfs(r.URL.Query().Get("path"), &st); err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		fmt.Fprint(w, st.Blocks*uint64(st.Bsize))
	})
	fmt.Println("probe listening")
	log.Fatal(http.ListenAndServe(":49983", mux))
}

// ptyRoundTrip opens a new pseudo-terminal pair, writes a line into the
// master and reads it from the slave; it returns the slave's name.
func ptyRoundTrip() (string, error) {
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	if err != nil {
		return "", err
	}
	defer master.Close()
	fd := int(master.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		return "", fmt.Errorf("unlockpt: %w", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		return "", fmt.Errorf("ptsname: %w", err)
	}
	name := fmt.Sprintf("/dev/pts/%d", n)
	slave, err := os.OpenFile(name, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return "", err
	}
	defer slave.Close()
	if _, err := master.WriteString("ping\n"); err != nil {
		return "", err
	}
	buf := make([]byte, 16)
	k, err := slave.Read(buf)
	if err != nil {
		return "", err
	}
	if string(buf[:k]) != "ping\n" {
		return "", fmt.Errorf("read %q through the pty", buf[:k])
	}
	return name, nil
}

// fill writes mb MiB of non-zero data to path and syncs it; it returns how
// many MiB were written before an error.
func fill(path string, mb int) (int, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return 0, err
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for i := 0; i < mb; i++ {
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return i, fmt.Errorf("write: %w", err)
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return mb, fmt.Errorf("fsync: %w", err)
	}
	if err := f.Close(); err != nil {
		return mb, fmt.Errorf("close: %w", err)
	}
	return mb, nil
}

func must(s string, err error) string {
	if err != nil {
		return err.Error()
	}
	return s
}
