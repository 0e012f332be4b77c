package template

// configureScript runs as root chrooted in the freshly debootstrapped rootfs,
// in a private mount namespace, with SUITE, MIRROR and SECURITY_MIRROR set.
// Its text is part of the cache key: editing it rebuilds the cached rootfs.
const configureScript = `set -eu

# Nothing may start a service, neither while the image is built nor later in a
# sandbox, where no init system would own it. invoke-rc.d asks this hook
# first; 101 means "action forbidden".
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d

# apt and maintainer scripts look at /proc. The mount dies with the build's
# mount namespace, so nothing leaks if the build is killed.
mount -t proc proc /proc

{
	echo "deb $MIRROR $SUITE main"
	echo "deb $MIRROR $SUITE-updates main"
	if [ "$SECURITY_MIRROR" != none ]; then
		echo "deb $SECURITY_MIRROR $SUITE-security main"
	fi
} > /etc/apt/sources.list

# debootstrap installs the release as first published; take the point and
# security updates so a new base does not start out with known holes.
apt-get -q update
apt-get -q -y -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold upgrade

# The user E2B sandboxes run as: uid 1000, home /home/user, bash, and
# passwordless sudo (agents install packages).
useradd --create-home --uid 1000 --user-group --shell /bin/bash --groups sudo user
printf 'user ALL=(ALL:ALL) NOPASSWD: ALL\n' > /etc/sudoers.d/user
chmod 0440 /etc/sudoers.d/user
visudo --check --quiet --file=/etc/sudoers.d/user

# Every commands.run is "bash -l -c …", and /etc/profile's "$(id -u)" costs
# a fork and an exec per command (about 10 ms under gVisor). Bash already
# knows its effective uid; other shells still ask id.
sed -i 's/"$(id -u)"/"${EUID:-$(id -u)}"/g' /etc/profile
grep -q 'EUID:-' /etc/profile

# Identity and name resolution; the runtime may overwrite them per sandbox.
echo cubicle > /etc/hostname
cat > /etc/hosts <<'EOF'
127.0.0.1	localhost
127.0.1.1	cubicle
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
EOF
rm -f /etc/resolv.conf
printf 'nameserver 8.8.8.8\nnameserver 1.1.1.1\n' > /etc/resolv.conf
# C.UTF-8 ships with libc; no locales package needed.
echo 'LANG=C.UTF-8' > /etc/default/locale

# Shrink. Package lists and caches come back with "apt-get update". Man
# pages and docs go, but their directories stay: some packages' maintainer
# scripts fail without /usr/share/man/man1. Copyright files stay because
# Debian's licenses ask for them to travel with the binaries.
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
find /usr/share/man /usr/share/info -mindepth 1 ! -type d -delete
find /usr/share/locale -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
rm -rf /usr/share/lintian /usr/share/linda /var/log/apt/* /var/log/*.log /root/.cache
find /run /tmp -mindepth 1 ! -type d -delete

# Fail the build, not a sandbox, when a promised tool is missing.
for tool in bash python3 pip3 node git curl sudo ps less; do
	command -v "$tool" > /dev/null || { echo "missing: $tool" >&2; exit 1; }
done
echo "versions: $(python3 --version 2>&1), node $(node --version), $(git --version), $(curl --version | head -n 1 | cut -d' ' -f1-2)"

umount /proc
`
