package buildspec

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
	"slices"
	"strings"
)

// Cache keys chain: the key of a step's result is a hash of the key of the
// result it starts from and of everything the step's outcome depends on, so
// a change anywhere before a step changes its key and every later one, and
// an unchanged prefix of a build keeps its keys and reuses its results.
//
// Every field is length-prefixed and the encoding is versioned (keyVersion),
// so two different inputs never encode alike and a change to what a step
// means can retire all old keys at once by bumping the version.
const keyVersion = "cubicle/buildspec/v1"

// BaseKey is the key of a build's starting point. source must name the
// base's exact content, never a moving name: "image:" plus the resolved
// manifest digest (not the tag, which moves), or "template:" plus the build
// ID of the template built from. Registry credentials do not change the
// content and are left out.
func BaseKey(source string) string {
	h := newKeyHash("base")
	writeField(h, source)
	return hex.EncodeToString(h.Sum(nil))
}

// StepKey is the key of the result of step st run on the result keyed
// parent, in state s (the state before st, as State.Apply built it). What
// goes in:
//
//   - parent: the whole history before the step, base included;
//   - st.Type and every arg, verbatim (unexpanded; the expansion is a
//     function of them and of s);
//   - for COPY: st.FilesHash and filesDigest, the SHA-256 of the uploaded
//     tar's bytes as the server stored them. The client's filesHash is a
//     recipe over file metadata that the server cannot recompute from the
//     tar (directory sizes are not in it), so the content digest is what
//     makes a re-upload with other bytes under the same filesHash miss the
//     cache instead of reusing a stale step. Pass "" for other steps;
//   - s: user, sudo, workdir and the environment (sorted by name, since
//     order does not change what a process sees). The state is already
//     determined by parent, but naming it makes a key stand on its own.
//
// Not in: st.Force and Spec.Force (they say whether to read the cache, not
// what the result is), the client-only COPY options (forceUpload, gzip,
// resolveSymlinks: their effect is in the uploaded bytes), timestamps, the
// template's name or ID.
func StepKey(parent string, s State, st Step, filesDigest string) string {
	h := newKeyHash("step")
	writeField(h, parent)
	writeField(h, strings.ToUpper(st.Type))
	writeInt(h, len(st.Args))
	for _, a := range st.Args {
		writeField(h, a)
	}
	if st.Type == Copy {
		writeField(h, st.FilesHash)
		writeField(h, filesDigest)
	}
	writeState(h, s)
	return hex.EncodeToString(h.Sum(nil))
}

// FinalKey is the key of the finished template: the last step's result
// plus the start and ready commands run on it, in the final state.
func FinalKey(parent string, s State, startCmd, readyCmd string) string {
	h := newKeyHash("final")
	writeField(h, parent)
	writeField(h, startCmd)
	writeField(h, readyCmd)
	writeState(h, s)
	return hex.EncodeToString(h.Sum(nil))
}

func newKeyHash(kind string) hash.Hash {
	h := sha256.New()
	writeField(h, keyVersion)
	writeField(h, kind)
	return h
}

func writeState(h hash.Hash, s State) {
	writeField(h, s.User)
	if s.Sudo {
		writeField(h, "sudo")
	} else {
		writeField(h, "")
	}
	writeField(h, s.Workdir)
	env := slices.Clone(s.Env)
	slices.SortFunc(env, func(a, b EnvVar) int { return strings.Compare(a.Name, b.Name) })
	writeInt(h, len(env))
	for _, e := range env {
		writeField(h, e.Name)
		writeField(h, e.Value)
	}
}

func writeField(h hash.Hash, s string) {
	writeInt(h, len(s))
	h.Write([]byte(s))
}

func writeInt(h hash.Hash, n int) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(n))
	h.Write(b[:])
}
