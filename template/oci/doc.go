// Package oci turns an OCI or Docker image into a root filesystem directory
// and the part of the image's config a template build needs.
//
// Resolve finds an image: a registry reference (auth from
// ~/.docker/config.json), an OCI image layout on disk (oci-layout://DIR) or
// a `docker save` tarball (docker-archive://FILE). It picks the host's
// platform from a multi-platform index, and refuses an image built for
// another one.
//
// Unpack applies the image's layers, in order, to an empty directory the way
// an overlay filesystem would stack them: whiteouts and opaque directories
// remove what lower layers had, hard links join files of this or earlier
// layers, and every entry gets the owner, mode (setuid, setgid and sticky
// bits included), extended attributes and times its tar header gives,
// owners as numbers, never mapped through the host's users. Of extended
// attributes only those the image's programs use are applied (user.*, file
// capabilities, POSIX ACLs); trusted.* and the building host's security
// labels are dropped.
//
// Layer contents are untrusted: every path is resolved by the kernel inside
// the destination (openat2 with RESOLVE_IN_ROOT), so neither "../" names
// nor symbolic links made by earlier entries can reach outside it, and a
// name that climbs above the root is refused. Sparse entries, which
// archive/tar would expand to as many zeros as they claim, are refused.
// Every layer's content is checked against the diff ID the image config
// names, and the config against the manifest, whatever the source; a
// mismatch is ErrCorrupt.
//
// Cache keeps unpacked images by digest, so that builds from one image
// unpack it once.
//
// Unpack writes as root would: ownership, device nodes and
// security.capability need CAP_CHOWN, CAP_MKNOD and CAP_SETFCAP. The directory it
// fills holds setuid binaries and device nodes of the image's choosing, so it
// belongs under a directory only root can enter.
package oci
