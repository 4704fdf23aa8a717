#!/usr/bin/env bash
# The VM tier: cgroup v2 limits (pids_max, memory_max + memory.oom.group, cpu_max) under a real
# systemd with every controller, which these machines only have inside a VM (../../../shared/RIG.md).
#
# Builds a Debian bookworm root (cached as a tarball keyed by its package list), adds the
# release binaries and guest/ (a test supervisor unit with Delegate=yes, its config, the checks
# and the misbehaving apps), makes an ext4 image, boots it under qemu (TCG, Debian's cloud
# kernel, no initramfs) and reads the results back from a second disk. Prints one line per
# check and "N passed, N failed" last; exits non-zero on any failure, printing the VM's console.
#
# Needs root (mounts nothing on the host, but unpacks a root file system with its owners).
# Installs qemu-system-x86, e2fsprogs and mmdebstrap with apt if missing; the kernel package
# is downloaded and unpacked into the cache, never installed on the host.
#
# Environment: TENEMENT_VM_CACHE (default /var/cache/tenement-test/vm), TENEMENT_VM_TIMEOUT
# (seconds qemu may run, default 1200: it only bounds a hang, above the guest's own
# TimeoutStartSec of 900), TENEMENT_VM_KEEP=1 keeps the work directory.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
CACHE=${TENEMENT_VM_CACHE:-/var/cache/tenement-test/vm}
TIMEOUT=${TENEMENT_VM_TIMEOUT:-1200}
SUITE=bookworm
# What the guest needs; the cached root tarball is keyed by this list.
PACKAGES=systemd,systemd-sysv,dbus,udev,kmod,python3,procps,iproute2,curl,nftables
KERNEL_META=linux-image-cloud-amd64

passed=0
failed=0
work=""
qemu_pid=""
stage_name=""
stage_start=0

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
pass() { passed=$((passed + 1)); echo "PASS $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }

stage() { # stage NAME: ends the previous stage (printing its duration) and starts NAME
    local now
    now=$(date +%s.%N)
    [ -n "$stage_name" ] && log "$(awk -v a="$stage_start" -v b="$now" -v n="$stage_name" 'BEGIN { printf "stage %-8s %6.1f s", n, b - a }')"
    stage_name=$1
    stage_start=$now
}

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    # qemu runs under timeout(1), which leads a process group of its own: signal the group.
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill -TERM -- "-$qemu_pid" 2>/dev/null
        sleep 1
        kill -KILL -- "-$qemu_pid" 2>/dev/null
        wait "$qemu_pid" 2>/dev/null
    fi
    if [ -n "$work" ] && [ -d "$work" ]; then
        if [ "${TENEMENT_VM_KEEP:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ]
    exit
}

# A setup step failed: one FAIL line for it, then the summary.
setup_failed() {
    fail "vm setup: $*"
    finish
}

apt_quiet() { # apt-get without the host image's docker-clean hook (RIG.md: "apt trap")
    local conf
    conf=$(mktemp)
    echo '#clear DPkg::Post-Invoke;' >"$conf"
    DEBIAN_FRONTEND=noninteractive apt-get -c "$conf" -y -qq "$@"
    local status=$?
    rm -f "$conf"
    return $status
}

# ---- host tools ---------------------------------------------------------------------------
stage apt
[ "$(id -u)" = 0 ] || setup_failed "needs root (unpacks a root file system with its owners, runs chroot depmod)"
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || missing+=(e2fsprogs)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_quiet install --no-install-recommends "${missing[@]}" >&2 ||
        { apt_quiet update >&2 && apt_quiet install --no-install-recommends "${missing[@]}" >&2; } ||
        setup_failed "apt-get install ${missing[*]} failed"
fi

# ---- kernel: downloaded and unpacked, not installed -----------------------------------------
stage kernel
kernel_pkg() { apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
# fetch_kernel: sets kernel_dir and release from apt's current lists; downloads if not cached.
fetch_kernel() {
    local pkg version
    pkg=$(kernel_pkg)
    [ -n "$pkg" ] || return 1
    version=$(apt-cache show --no-all-versions "$pkg" | awk '/^Version:/ {print $2; exit}')
    release=${pkg#linux-image-}
    kernel_dir="$CACHE/kernel/${pkg}_$version"
    [ -s "$kernel_dir/boot/vmlinuz-$release" ] && return 0
    log "downloading $pkg $version"
    rm -rf "$kernel_dir" "$kernel_dir.partial"
    mkdir -p "$kernel_dir.partial" &&
        (cd "$kernel_dir.partial" && apt-get download -qq "$pkg=$version" 2>&1 | grep -v unsandboxed >&2; [ -n "$(ls ./*.deb 2>/dev/null)" ]) &&
        dpkg-deb -x "$kernel_dir.partial"/*.deb "$kernel_dir.partial/root" &&
        mv "$kernel_dir.partial/root" "$kernel_dir" &&
        rm -rf "$kernel_dir.partial"
}
# Stale package lists name a kernel the archive no longer has: update once and retry.
fetch_kernel || { apt_quiet update >&2 && fetch_kernel; } ||
    setup_failed "cannot download and unpack $KERNEL_META's kernel with apt-get download"
vmlinuz="$kernel_dir/boot/vmlinuz-$release"
[ -s "$vmlinuz" ] || setup_failed "no $vmlinuz in the kernel package"

# ---- root file system tarball ---------------------------------------------------------------
stage rootfs
key=$(printf '%s %s minbase' "$PACKAGES" "$SUITE" | sha256sum | cut -c1-16)
tarball="$CACHE/rootfs-$SUITE-$key.tar"
if [ ! -s "$tarball" ]; then
    log "building the $SUITE root file system (cached as $tarball)"
    mkdir -p "$CACHE"
    mmdebstrap --quiet --variant=minbase --format=tar --include="$PACKAGES" "$SUITE" \
        "$tarball.partial" >&2 || setup_failed "mmdebstrap failed"
    mv "$tarball.partial" "$tarball"
fi

# ---- release binaries -------------------------------------------------------------------------
stage build
target_dir=${CARGO_TARGET_DIR:-$repo/target}
(cd "$repo" && cargo build --release -q -p tenement-supervisor -p tenement-proxy -p tenctl -p tenement-fixtures) >&2 ||
    setup_failed "cargo build --release failed"
binaries=(tenement-supervisor tenement-exec tenement-proxy tenctl tiny-http)
for bin in "${binaries[@]}"; do
    [ -x "$target_dir/release/$bin" ] || setup_failed "no $target_dir/release/$bin after the build"
done
"$target_dir/release/tenctl" validate "$here/guest/tenement.toml" >&2 ||
    setup_failed "the guest config does not validate"

# ---- images -------------------------------------------------------------------------------------
stage image
mkdir -p "$CACHE"
# Work directories of runs that were killed outright (no EXIT trap) and are long dead.
find "$CACHE" -maxdepth 1 -name 'run.*' -type d -mmin +120 -exec rm -rf {} + 2>/dev/null
work=$(mktemp -d "$CACHE/run.XXXXXX") || setup_failed "cannot create a work directory"
root="$work/root"
mkdir "$root"
# --numeric-owner: the guest's uids, not whatever the host's names map to.
tar -C "$root" --numeric-owner -xf "$tarball" || setup_failed "cannot unpack $tarball"
echo tenement-vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 tenement-vm\n' >"$root/etc/hosts"
# A set machine id: no first-boot preset run.
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$root/etc/machine-id"
echo >>"$root/etc/machine-id"
echo '/dev/nvme0n1 / ext4 rw,noatime 0 1' >"$root/etc/fstab"
mkdir -p "$root/usr/lib/modules"
cp -a "$kernel_dir/lib/modules/$release" "$root/usr/lib/modules/" ||
    setup_failed "cannot copy the kernel modules"
chroot "$root" depmod "$release" || setup_failed "depmod in the image failed"
# The proxy's own user (proxy_user in the guest's config), as the packages' sysusers.d makes it.
chroot "$root" useradd --system --no-create-home --shell /usr/sbin/nologin tenement-proxy ||
    setup_failed "useradd tenement-proxy in the image failed"
for bin in "${binaries[@]}"; do
    install -m 0755 "$target_dir/release/$bin" "$root/usr/local/bin/$bin"
done
install -d "$root/opt/tenement-vm" "$root/etc/tenement"
install -m 0644 "$here/guest/checks.py" "$here/guest/bomb.py" "$here/guest/hog.py" "$root/opt/tenement-vm/"
install -m 0644 "$here/guest/tenement.toml" "$root/etc/tenement/tenement.toml"
units="$root/etc/systemd/system"
install -m 0644 "$here/guest/tenement-supervisor.service" "$here/guest/tenement-proxy.service" \
    "$here/guest/tenement-vm-checks.service" "$units/"
mkdir -p "$units/multi-user.target.wants"
ln -sf ../tenement-vm-checks.service "$units/multi-user.target.wants/tenement-vm-checks.service"
ln -sf /lib/systemd/system/multi-user.target "$units/default.target"
# Nothing reads a login prompt, and timers only cost boot time.
for unit in serial-getty@.service getty@.service apt-daily.timer apt-daily-upgrade.timer \
    dpkg-db-backup.timer e2scrub_all.timer fstrim.timer systemd-tmpfiles-clean.timer; do
    ln -sf /dev/null "$units/$unit"
done
mkfs.ext4 -q -F -L tenement-root -d "$root" "$work/root.img" 1200M >&2 ||
    setup_failed "mkfs.ext4 -d of the root failed"
rm -rf "$root"
mkfs.ext4 -q -F -L tenement-share "$work/share.img" 64M >&2 || setup_failed "mkfs.ext4 of the share failed"

# ---- boot -----------------------------------------------------------------------------------------
stage boot
console="$work/console.log"
# One NVMe controller with two namespaces: the root is always nvme0n1, the share nvme0n2.
timeout -k 5 "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -smp 2 -m 1024 \
    -nodefaults -display none -no-reboot -serial "file:$console" \
    -kernel "$vmlinuz" \
    -append "console=ttyS0 root=/dev/nvme0n1 rw rootfstype=ext4 panic=-1 loglevel=4" \
    -drive "if=none,id=root,file=$work/root.img,format=raw" \
    -drive "if=none,id=share,file=$work/share.img,format=raw" \
    -device nvme,id=nvme0,serial=tenement \
    -device nvme-ns,drive=root,bus=nvme0,nsid=1 \
    -device nvme-ns,drive=share,bus=nvme0,nsid=2 \
    </dev/null >"$work/qemu.log" 2>&1 &
qemu_pid=$!
wait "$qemu_pid"
qemu_status=$?
qemu_pid=""

# ---- results --------------------------------------------------------------------------------------
stage results
if [ "$qemu_status" = 0 ]; then
    pass "the VM ran the checks and powered off"
elif [ "$qemu_status" = 124 ] || [ "$qemu_status" = 137 ]; then
    fail "the VM ran the checks and powered off: killed after ${TIMEOUT} s"
else
    fail "the VM ran the checks and powered off: qemu exited $qemu_status: $(tail -3 "$work/qemu.log" | tr '\n' ' ')"
fi
mkdir -p "$work/share"
debugfs -R "rdump /out $work/share" "$work/share.img" >/dev/null 2>&1
results="$work/share/out/results.txt"
if [ -s "$results" ]; then
    while IFS= read -r line; do
        case "$line" in
            PASS\ *) pass "${line#PASS }" ;;
            FAIL\ *) fail "${line#FAIL }" ;;
        esac
    done <"$results"
else
    fail "the VM wrote results to its share disk: none in $work/share.img"
fi
stage ""
if [ "$failed" != 0 ]; then
    echo "---- VM serial console ($console) ----"
    cat "$console" 2>/dev/null
    if [ -s "$work/share/out/supervisor.log" ]; then
        echo "---- supervisor journal (last 60 lines) ----"
        tail -60 "$work/share/out/supervisor.log"
    fi
    [ "${TENEMENT_VM_KEEP:-0}" = 1 ] || echo "(TENEMENT_VM_KEEP=1 keeps the images, logs and status documents)"
fi
finish
