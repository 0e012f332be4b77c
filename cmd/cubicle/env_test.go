package main

import (
	"strings"
	"testing"
)

// TestNumericEnv: serve's numeric flags take their CUBICLE_* variables,
// parsed as the flags parse their own values: a malformed value is an
// error naming the variable, never a silent default, and a flag given on
// the command line wins over its variable.
func TestNumericEnv(t *testing.T) {
	for name, key := range numericEnv {
		if serveCmd().Flags().Lookup(name) == nil {
			t.Fatalf("numericEnv names --%s (%s), which serve does not have", name, key)
		}
	}
	for _, tc := range []struct {
		name, env, value string
		cmdline          string // set on the command line first, if not ""
		want             string // the flag's value, or the error's text
		wantErr          bool
	}{
		{"a number", "CUBICLE_POOL_SIZE", "7", "", "7", false},
		{"not a number", "CUBICLE_POOL_SIZE", "abc", "", "CUBICLE_POOL_SIZE", true},
		{"a float", "CUBICLE_OVERCOMMIT_CPU", "2.5", "", "2.5", false},
		{"not a float", "CUBICLE_OVERCOMMIT_MEMORY", "lots", "", "CUBICLE_OVERCOMMIT_MEMORY", true},
		{"the command line wins", "CUBICLE_NETWORK_SPARES", "abc", "3", "3", false},
		{"unset keeps the default", "CUBICLE_RESERVE_DISK_MB", "", "", "1024", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(tc.env, tc.value)
			var flag string
			for n, k := range numericEnv {
				if k == tc.env {
					flag = n
				}
			}
			f := serveCmd().Flags()
			if tc.cmdline != "" {
				if err := f.Set(flag, tc.cmdline); err != nil {
					t.Fatal(err)
				}
			}
			err := fromEnv(f, numericEnv)
			if tc.wantErr {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("fromEnv with %s=%q: %v, want an error naming %s", tc.env, tc.value, err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := f.Lookup(flag).Value.String(); got != tc.want {
				t.Fatalf("--%s = %q, want %q", flag, got, tc.want)
			}
		})
	}
}
