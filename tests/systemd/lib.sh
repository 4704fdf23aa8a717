# shellcheck shell=bash
# Helpers for booting Debian bookworm under systemd-nspawn with a real systemd as PID 1.
# Sourced by run.sh. Facts behind each step: ../../../shared/RIG.md (the host has no D-Bus and
# its PID 1 is not systemd, so machinectl/systemd-run -M do not work: nsenter does).
#
# Every container started here is recorded in CONTAINERS and killed by stop_all_containers,
# which run.sh calls from an EXIT trap: a dying test never leaves a container behind.

CACHE_DIR=${TENEMENT_TEST_CACHE:-/var/cache/tenement-test}
# What the test root needs; the cached tarball is keyed by this list.
# rpm: the .rpm's scriptlets are also run inside the booted root (upgrade, erase).
ROOTFS_PACKAGES=systemd,systemd-sysv,dbus,curl,python3,iproute2,procps,rpm,nftables
CONTAINERS=()       # "leader_pid:nspawn_pid:log" of each booted container
CGROUP_NAME=tenement-e2e-$$
# Seconds to wait for a container's systemd to appear, then to be up, and to power off: they
# only bound a hang, and are generous because a loaded 2-core machine boots slowly.
BOOT_DEADLINE=120
POWEROFF_DEADLINE=60

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

# The root file system tarball, built once with mmdebstrap and cached by package list.
rootfs_tarball() {
    local key
    key=$(printf '%s bookworm minbase' "$ROOTFS_PACKAGES" | sha256sum | cut -c1-16)
    local tarball="$CACHE_DIR/bookworm-$key.tar"
    if [ ! -s "$tarball" ]; then
        mkdir -p "$CACHE_DIR"
        log "building the bookworm root file system (cached as $tarball)"
        local partial="${tarball%.tar}.partial.tar"
        mmdebstrap --quiet --format=tar --variant=minbase --include="$ROOTFS_PACKAGES" \
            bookworm "$partial" >&2 || { rm -f "$partial"; return 1; }
        mv "$partial" "$tarball"
    fi
    printf '%s\n' "$tarball"
}

# unpack_root TARBALL DIR: a fresh root with its own hostname.
unpack_root() {
    mkdir -p "$2"
    tar -C "$2" -xf "$1"
    echo tenement-e2e >"$2/etc/hostname"
    # No getty on the container's console: nothing reads it.
    rm -f "$2/etc/systemd/system/getty.target.wants/"* 2>/dev/null || true
}

# Removes the empty cgroups of earlier runs that died without cleaning up (SIGKILL).
remove_stale_cgroups() {
    local dir
    for dir in /sys/fs/cgroup/unified/tenement-e2e-* /sys/fs/cgroup/systemd/tenement-e2e-*; do
        [ -d "$dir" ] || continue
        kill -0 "${dir##*-}" 2>/dev/null && continue
        find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || log "stale cgroup $dir is not empty"
    done
    return 0
}

# Runs nspawn's payload in a cgroup of its own (v1 name=systemd and the v2 mount), so the
# container's cgroups do not land at the host's roots. The shell that starts nspawn moves.
enter_own_cgroup() {
    local hierarchy
    for hierarchy in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do
        [ -d "$hierarchy" ] || continue
        mkdir -p "$hierarchy/$CGROUP_NAME"
        echo $BASHPID >"$hierarchy/$CGROUP_NAME/cgroup.procs"
    done
}

# Removes the cgroups (children first) once every container is gone; the last processes
# of a container may take a moment to leave them.
remove_own_cgroup() {
    local hierarchy
    for hierarchy in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do
        local end=$((SECONDS + 30))
        while [ $SECONDS -lt $end ]; do
            [ -d "$hierarchy/$CGROUP_NAME" ] || break
            find "$hierarchy/$CGROUP_NAME" -depth -type d -exec rmdir {} + 2>/dev/null
            sleep 0.1
        done
        [ -d "$hierarchy/$CGROUP_NAME" ] && log "could not remove $hierarchy/$CGROUP_NAME"
    done
    return 0
}

# boot ROOT NAME LOG [extra nspawn args...]: boots and waits until systemd is up; sets LEADER
# to the container's PID 1 as seen from the host. Not in a $(...): the container must be a
# child of this shell, recorded in CONTAINERS.
boot() {
    local root=$1 name=$2 boot_log=$3
    shift 3
    (
        enter_own_cgroup
        # If this script dies without its EXIT trap (SIGKILL), nspawn still gets SIGTERM and
        # powers the container off.
        SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 exec setpriv --pdeathsig TERM systemd-nspawn -q -D "$root" -M "$name" \
            --register=no --keep-unit --private-network --console=read-only "$@" -b \
            </dev/null >"$boot_log" 2>&1
    ) &
    local nspawn=$!
    local leader=""
    LEADER=""
    # nspawn forks helpers before the payload: the leader is the child that has become
    # systemd (comm "systemd"), not the first child seen.
    local end=$((SECONDS + BOOT_DEADLINE))
    while [ $SECONDS -lt $end ]; do
        leader=$(cat /proc/$nspawn/task/*/children 2>/dev/null | awk '{print $1; exit}')
        if [ -n "$leader" ] && [ "$(cat /proc/$leader/comm 2>/dev/null)" = systemd ]; then
            break
        fi
        leader=""
        kill -0 $nspawn 2>/dev/null || break
        sleep 0.05
    done
    CONTAINERS+=("${leader:-0}:$nspawn:$boot_log")
    if [ -z "$leader" ]; then
        log "no systemd in the container within $BOOT_DEADLINE s (nspawn's log: $boot_log)"
        return 1
    fi
    local state=""
    end=$((SECONDS + BOOT_DEADLINE))
    while [ $SECONDS -lt $end ]; do
        state=$(nsenter -t "$leader" -a systemctl is-system-running 2>/dev/null)
        case "$state" in running | degraded) break ;; esac
        sleep 0.1
    done
    case "$state" in
        running | degraded) ;;
        *)
            log "systemd in the container did not come up (state: ${state:-none})"
            return 1
            ;;
    esac
    # shellcheck disable=SC2034 # read by the caller
    LEADER=$leader
}

# inside LEADER CMD...: runs CMD inside the container (all namespaces), with a clean environment.
inside() {
    local leader=$1
    shift
    nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}

# stop_container ENTRY: SIGTERM to nspawn (a clean poweroff, ~2 s), SIGKILL after
# POWEROFF_DEADLINE.
stop_container() {
    local leader=${1%%:*} rest=${1#*:}
    local nspawn=${rest%%:*}
    kill -0 "$nspawn" 2>/dev/null || return 0
    kill -TERM "$nspawn" 2>/dev/null
    local end=$((SECONDS + POWEROFF_DEADLINE))
    while [ $SECONDS -lt $end ]; do
        kill -0 "$nspawn" 2>/dev/null || return 0
        sleep 0.1
    done
    log "container $leader did not power off in $POWEROFF_DEADLINE s; killing it"
    [ "$leader" != 0 ] && kill -KILL "$leader" 2>/dev/null
    kill -KILL "$nspawn" 2>/dev/null
    wait "$nspawn" 2>/dev/null
}

stop_all_containers() {
    local entry
    for entry in "${CONTAINERS[@]+"${CONTAINERS[@]}"}"; do
        stop_container "$entry"
    done
    CONTAINERS=()
    remove_own_cgroup
}
