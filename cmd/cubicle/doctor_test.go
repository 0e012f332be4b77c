package main

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cubicle-dev/cubicle/hostcheck"
)

// TestDoctor: one line per item and one for the backend, and the exit
// status follows whether a backend can run, whatever this host has; a
// runsc that is not there takes gVisor away.
func TestDoctor(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		o    hostcheck.Options
	}{
		{"as serve finds runsc", nil, hostcheck.Options{}},
		{"no runsc", []string{"--runsc", filepath.Join(t.TempDir(), "runsc")}, hostcheck.Options{Runsc: filepath.Join(t.TempDir(), "runsc")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			cmd := doctorCmd()
			cmd.SetOut(&out)
			cmd.SetArgs(tc.args)
			err := cmd.Execute()
			t.Logf("\n%s", &out)
			want := hostcheck.Check(tc.o)
			lines := strings.Split(strings.TrimSpace(out.String()), "\n")
			if len(lines) != len(want.Items)+1 {
				t.Fatalf("%d lines, want %d", len(lines), len(want.Items)+1)
			}
			if !strings.HasPrefix(lines[len(lines)-1], "backend") {
				t.Errorf("last line %q", lines[len(lines)-1])
			}
			if (want.Backend == "") != errors.Is(err, errNoBackend) {
				t.Errorf("backend %q, doctor's error %v", want.Backend, err)
			}
			if want.Backend != "" && !strings.Contains(lines[len(lines)-1], want.Backend) {
				t.Errorf("backend line %q, want %s", lines[len(lines)-1], want.Backend)
			}
		})
	}
}
