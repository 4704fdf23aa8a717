#!/usr/bin/env bash
# End to end in a real systemd: builds the .deb and the .rpm, boots Debian bookworm under
# systemd-nspawn (own network namespace, own cgroup), installs the .deb with dpkg and checks
# what issue 5 asks for, then installs the .rpm into a second root with `rpm --root` and
# boots that too. One line per check (PASS, FAIL, XFAIL, SKIP), the logs of a failure
# printed right under it, stage timings, and "N passed, N failed" last. Exits non-zero on
# any FAIL.
#
# Usage: tests/systemd/run.sh [--list] [--skip CHECK[,CHECK...]] [CHECK...]
#   CHECK...  judge only these checks
#   --skip    do not judge these checks (reported as SKIP)
#   Checks that are also steps (installing, waking alice and bob, removing) still run when
#   not judged, so that the checks after them see the state they expect.
#   VERBOSE=1 prints the output of passing checks too (exposure scores, restart counts).
#   --list    print the checks and exit
# Needs root. Installs what it needs (systemd-container, mmdebstrap, lintian, rpm,
# cargo-deb) when missing; caches the root file system under /var/cache/tenement-test/.
# Facts behind the recipe: ../../../shared/RIG.md.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
source tests/systemd/lib.sh

# Checks that exercise work not finished yet: a failure is reported as XFAIL (not counted
# as a failure), a pass as PASS with a note to take it off this list when it is done.
# The three under-load checks fail now and then (about 1 proxy restart in 15 right after a
# supervisor restart): on SIGTERM the proxy stops accepting and shuts hyper down gracefully,
# which closes connections accepted a moment earlier whose request is not parsed yet; the
# unread request makes that close a reset ("Connection reset by peer"). Fixed in the proxy,
# they come off this list.
PENDING=()

# Steps other checks depend on: run even when not judged.
STEPS=(deb.install deb.wake_by_request deb.tenctl_wake_as_root deb.remove_stops_everything
    deb.purge_removes_config_data_users rpm.install_into_root rpm.wake_by_request
    rpm.erase_stops_everything)

ALL_CHECKS=(
    static.units_verify static.lintian_no_errors static.rpm_contents static.rpm_scriptlets
    deb.install deb.socket_enabled deb.supervisor_active deb.accounts_and_dirs
    deb.rpc_socket_modes deb.port_80_held_by_pid1 deb.proxy_not_running deb.shipped_config_valid
    deb.units_verify_in_place deb.fleet_agent_shipped_not_enabled deb.wake_by_request deb.both_daemons_active
    deb.instance_in_supervisor_cgroup deb.tenctl_wake_as_root deb.tenctl_refused_unprivileged
    deb.tenctl_admin_group_member deb.default_example_service deb.sandbox_instance_serves deb.reload_adds_service
    deb.journal_has_instance_lines
    deb.restarts_lose_no_request deb.upgrade_loses_no_request deb.supervisor_socket_activated
    deb.proxy_has_no_privilege deb.proxy_crash_loop_keeps_port_80 deb.https_socket_serves_a_file_certificate
    deb.remove_stops_everything deb.purge_removes_config_data_users
    rpm.install_into_root rpm.socket_enabled rpm.supervisor_active rpm.port_80_held_by_pid1
    rpm.wake_by_request rpm.tenctl_wake_as_root rpm.upgrade_loses_no_request rpm.erase_stops_everything
)

selected=()
skipped=()
while [ $# -gt 0 ]; do
    case $1 in
        --list) printf '%s\n' "${ALL_CHECKS[@]}"; exit 0 ;;
        --skip) IFS=, read -r -a more <<<"$2"; skipped+=("${more[@]}"); shift ;;
        --skip=*) IFS=, read -r -a more <<<"${1#--skip=}"; skipped+=("${more[@]}") ;;
        -*) echo "unknown option $1; see the top of $0" >&2; exit 2 ;;
        *) selected+=("$1") ;;
    esac
    shift
done
for name in "${selected[@]+"${selected[@]}"}" "${skipped[@]+"${skipped[@]}"}"; do
    [[ " ${ALL_CHECKS[*]} " == *" $name "* ]] || { echo "unknown check $name (--list)" >&2; exit 2; }
done

if [ "$(id -u)" != 0 ]; then
    echo "FAIL: tests/systemd/run.sh needs root (systemd-nspawn, dpkg, cgroups)"
    echo "0 passed, 1 failed"
    exit 1
fi

work=$(mktemp -d /tmp/tenement-e2e.XXXXXX)
remove_stale_cgroups
passed=0
failed=0
xfailed=0
failures=()
timings=()

cleanup() {
    stop_all_containers
    rm -rf "$work/deb-root" "$work/rpm-root"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wanted() { # wanted CHECK: selected (or nothing selected) and not skipped
    local name=$1
    [[ " ${skipped[*]+"${skipped[*]}"} " == *" $name "* ]] && return 1
    [ ${#selected[@]} -eq 0 ] && return 0
    [[ " ${selected[*]} " == *" $name "* ]]
}

# check NAME COMMAND...: runs COMMAND, one line of verdict, its output under a failure.
check() {
    local name=$1
    shift
    if ! wanted "$name"; then
        if [[ " ${STEPS[*]} " == *" $name "* ]]; then
            "$@" >/dev/null 2>&1
            echo "SKIP  $name (ran as a step, not judged)"
        else
            echo "SKIP  $name"
        fi
        return 0
    fi
    local out status pending=0
    out=$("$@" 2>&1)
    status=$?
    [[ " ${PENDING[*]+"${PENDING[*]}"} " == *" $name "* ]] && pending=1
    if [ $status = 0 ]; then
        passed=$((passed + 1))
        if [ $pending = 1 ]; then
            echo "PASS  $name (on the PENDING list of $0: take it off once its fix is in)"
        else
            echo "PASS  $name"
        fi
        [ -n "${VERBOSE:-}" ] && [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/      /'
    elif [ $pending = 1 ]; then
        xfailed=$((xfailed + 1))
        echo "XFAIL $name (expected until the work it checks is done)"
        printf '%s\n' "$out" | tail -5 | sed 's/^/      /'
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "FAIL  $name"
        printf '%s\n' "$out" | tail -40 | sed 's/^/      /'
        # What the daemons said around the failure, so a CI log is enough to see why.
        if [ -n "${LEADER:-}" ]; then
            echo "      --- journal (tenement units, last 25 lines)"
            inside "$LEADER" journalctl -u tenement-proxy -u tenement-supervisor -n 25 --no-pager \
                2>/dev/null | cut -c1-240 | sed 's/^/      /'
        fi
        FAILED_IN_CONTAINER=1
    fi
    return 0
}

# stage NAME: starts timing a stage (the previous one ends).
stage_name=""
stage_start=0
stage() {
    local now
    now=$(date +%s.%N)
    if [ -n "$stage_name" ]; then
        timings+=("$(awk -v n="$stage_name" -v a="$now" -v b="$stage_start" 'BEGIN { printf "%-26s %6.1f s", n, a - b }')")
    fi
    stage_name=$1
    stage_start=$now
    [ -n "$1" ] && printf '\n== %s\n' "$1"
}

# Prints the container's journal for the tenement units when a check in it failed.
dump_container_logs() {
    [ -n "${FAILED_IN_CONTAINER:-}" ] || return 0
    [ -n "${LEADER:-}" ] || return 0
    echo "---- journal of the tenement units in the container (last 80 lines)"
    inside "$LEADER" journalctl --no-pager -o short-precise -n 80 \
        -u tenement.socket -u tenement-proxy.service -u tenement-supervisor.service \
        -u tenement-supervisor-admin.socket -u tenement-supervisor-proxy.socket 2>&1 | sed 's/^/    /'
    echo "---- systemctl --failed"
    inside "$LEADER" systemctl --failed --no-pager 2>&1 | sed 's/^/    /'
    FAILED_IN_CONTAINER=
}

# ---- what this needs ----------------------------------------------------------------------
stage "install test tools"
need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v lintian >/dev/null || need+=(lintian)
command -v rpmbuild >/dev/null || need+=(rpm)
if [ ${#need[@]} -gt 0 ]; then
    # The image's docker-clean hook deletes downloaded .debs between dpkg runs, which breaks
    # installing systemd-container (it upgrades systemd): switch it off for this call.
    printf '#clear DPkg::Post-Invoke;\n#clear APT::Update::Post-Invoke;\n' >"$work/apt.conf"
    echo "apt-get install ${need[*]}"
    apt-get -c "$work/apt.conf" update -qq >"$work/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get -c "$work/apt.conf" install -y -qq "${need[@]}" \
        >>"$work/apt.log" 2>&1 || { tail -30 "$work/apt.log"; echo "0 passed, 1 failed"; exit 1; }
fi
if ! command -v cargo-deb >/dev/null; then
    echo "cargo install --locked cargo-deb"
    cargo install --locked --quiet cargo-deb || { echo "0 passed, 1 failed"; exit 1; }
fi

# ---- packages -------------------------------------------------------------------------------
stage "build packages"
if ! packaging/build.sh >"$work/build.log" 2>&1; then
    tail -40 "$work/build.log"
    echo "FAIL  packaging/build.sh"
    echo "0 passed, 1 failed"
    exit 1
fi
target_dir=${CARGO_TARGET_DIR:-target}
deb=$(ls -t "$target_dir"/debian/tenement_*.deb | head -1)
rpm_file=$(find "$target_dir/rpm/RPMS" -name 'tenement-*.rpm' | head -1)
echo "built $deb and $rpm_file"

stage "static checks"
check static.units_verify tests/systemd/check-units.sh "$target_dir/release"
lintian_errors() {
    local out
    out=$(lintian --pedantic "$deb" 2>&1 | grep -v 'running with root privileges')
    printf '%s\n' "$out"
    ! printf '%s\n' "$out" | grep -q '^E:'
}
check static.lintian_no_errors lintian_errors
rpm_contents() {
    local listing missing=0 path
    listing=$(rpm -qlp "$rpm_file") || return 1
    for path in /usr/bin/tenement-supervisor /usr/bin/tenement-proxy /usr/bin/tenctl \
        /usr/bin/tenement-fleet /usr/lib/systemd/system/tenement-fleet.service \
        /usr/share/man/man8/tenement-fleet.8.gz \
        /usr/libexec/tenement/tenement-exec /usr/lib/systemd/system/tenement.socket \
        /usr/lib/systemd/system/tenement-proxy.service \
        /usr/lib/systemd/system/tenement-supervisor.service \
        /usr/lib/systemd/system/tenement-supervisor-admin.socket \
        /usr/lib/systemd/system/tenement-supervisor-proxy.socket \
        /usr/lib/sysusers.d/tenement.conf /usr/lib/tmpfiles.d/tenement.conf \
        /etc/tenement/tenement.toml /usr/share/man/man1/tenctl.1.gz \
        /usr/share/man/man5/tenement.toml.5.gz /usr/share/bash-completion/completions/tenctl; do
        grep -qx "$path" <<<"$listing" || { echo "missing from the rpm: $path"; missing=1; }
    done
    rpm -qp --configfiles "$rpm_file" | grep -qx /etc/tenement/tenement.toml ||
        { echo "tenement.toml is not a %config file"; missing=1; }
    return $missing
}
check static.rpm_contents rpm_contents
rpm_scriptlets() {
    local scripts
    scripts=$(rpm -qp --scripts "$rpm_file") || return 1
    grep -q 'systemctl --no-reload preset' <<<"$scripts" &&
        grep -q 'systemctl --no-reload disable' <<<"$scripts" &&
        grep -q 'try-restart' <<<"$scripts" &&
        grep -q 'systemd-sysusers' <<<"$scripts" || { printf '%s\n' "$scripts"; return 1; }
}
check static.rpm_scriptlets rpm_scriptlets

stage "root file system"
tarball=$(rootfs_tarball) || { echo "FAIL  building the root file system"; echo "$passed passed, $((failed + 1)) failed"; exit 1; }
echo "$tarball"

# ---- the .deb in a booted bookworm ------------------------------------------------------------
stage "deb: boot"
FAILED_IN_CONTAINER=
root=$work/deb-root
unpack_root "$tarball" "$root"
mkdir -p "$root/pkgs" "$root/srv"
cp "$deb" "$root/pkgs/"
cp -a examples/notes "$root/srv/notes"
rm -rf "$root/srv/notes/data"
if ! boot "$root" tenement-deb "$work/deb-boot.log"; then
    echo "FAIL  booting the deb container"
    tail -30 "$work/deb-boot.log"
    echo "$passed passed, $((failed + 1)) failed"
    exit 1
fi
L=$LEADER
sh_in() { inside "$L" /bin/bash -c "$1"; }
debname=$(basename "$deb")

stage "deb: install"
check deb.install sh_in "dpkg -i /pkgs/$debname"
check deb.socket_enabled sh_in 'test "$(systemctl is-enabled tenement.socket)" = enabled && systemctl is-active tenement.socket'
check deb.supervisor_active sh_in 'for u in tenement-supervisor.service tenement-supervisor-admin.socket tenement-supervisor-proxy.socket; do echo "$u: $(systemctl is-enabled $u) $(systemctl is-active $u)"; systemctl -q is-active $u || exit 1; done'
check deb.accounts_and_dirs sh_in '
    set -e
    getent passwd tenement-proxy; getent group tenement-proxy; getent group tenement-admin
    test "$(stat -c "%a %U" /var/lib/tenement)" = "755 root"
    test "$(stat -c "%a %U" /var/lib/tenement/data)" = "711 root"
    test "$(stat -c "%a %U" /var/lib/tenement/state)" = "700 root"
    test "$(stat -c "%a %U" /run/tenement)" = "755 root"
    dpkg-query -W -f="\${Conffiles}\n" tenement | grep -q /etc/tenement/tenement.toml'
check deb.rpc_socket_modes sh_in '
    stat -c "%n %A %U %G" /run/tenement/admin.sock /run/tenement/proxy.sock
    test "$(stat -c "%a %U %G" /run/tenement/admin.sock)" = "660 root tenement-admin" &&
    test "$(stat -c "%a %U %G" /run/tenement/proxy.sock)" = "660 root tenement-proxy"'
check deb.port_80_held_by_pid1 sh_in 'ss -Hltnp "sport = :80"; ss -Hltnp "sport = :80" | grep -q "pid=1,"'
check deb.proxy_not_running sh_in 'state=$(systemctl is-active tenement-proxy.service); echo "$state"; [ "$state" = inactive ]'
check deb.shipped_config_valid sh_in 'tenctl validate /etc/tenement/tenement.toml'
check deb.units_verify_in_place sh_in '
    cd /usr/lib/systemd/system
    out=$(systemd-analyze verify --man=no tenement.socket tenement-https.socket tenement-metrics.socket tenement-proxy.service tenement-supervisor.service tenement-supervisor-admin.socket tenement-supervisor-proxy.socket 2>&1)
    echo "$out"; [ -z "$out" ]
    echo "live exposure: $(systemd-analyze security tenement-proxy.service 2>/dev/null | tail -1)"
    echo "live exposure: $(systemd-analyze security tenement-supervisor.service 2>/dev/null | tail -1)"'
dump_container_logs

stage "deb: wake and control"
# The notes example with two tenants, added to the shipped config; the supervisor restarts to
# read it. Nothing connects to port 80 here, so the proxy must still not be running.
sh_in 'cat >>/etc/tenement/tenement.toml <<EOF

[service.notes]
command = "python3 app.py"
workdir = "/srv/notes"
health = "/health"
idle_timeout = "5m"
[service.notes.env]
DATA_DIR = "{data_dir}/{id}"

[service.boxed]
command = "python3 /srv/notes/app.py"
isolation = "sandbox"
listen = "activate"
health = "/health"
[service.boxed.env]
DATA_DIR = "{data_dir}/{id}"

[instances]
notes = ["alice", "bob"]
boxed = ["carol"]
EOF
tenctl validate && systemctl restart tenement-supervisor.service' >"$work/deb-config.log" 2>&1 ||
    cat "$work/deb-config.log"
# The fleet agent ships for hosts that join a fleet; the operator enables it. With the shipped
# config (no [fleet]) it refuses to run, in one line, and exits 2.
check deb.fleet_agent_shipped_not_enabled sh_in '
    state=$(systemctl is-enabled tenement-fleet.service); echo "tenement-fleet.service: $state"
    [ "$state" = disabled ] || exit 1
    tenement-fleet --version || exit 1
    out=$(tenement-fleet run 2>&1); code=$?; echo "run: exit $code: $out"
    [ $code = 2 ] && [ "$(printf "%s\n" "$out" | wc -l)" = 1 ] && printf "%s" "$out" | grep -q "has no \[fleet\] section"
    test -f /usr/share/man/man8/tenement-fleet.8.gz && test -f /usr/share/doc/tenement/FLEET.md && test -f /usr/share/doc/tenement/examples/haproxy.cfg'
check deb.wake_by_request sh_in '
    set -e
    test "$(systemctl is-active tenement-proxy.service)" = inactive || { echo "the proxy ran before any request"; exit 1; }
    token=$(curl -sS -f --max-time 30 -H "Host: alice.notes.localhost" http://127.0.0.1/token)
    curl -sS -f --max-time 30 -H "Host: alice.notes.localhost" -H "Authorization: Bearer $token" -d "hello from e2e" http://127.0.0.1/notes
    curl -sS -f --max-time 30 -H "Host: alice.notes.localhost" -H "Authorization: Bearer $token" http://127.0.0.1/notes | grep "hello from e2e"'
check deb.both_daemons_active sh_in 'systemctl is-active tenement-proxy.service tenement-supervisor.service'
instance_in_cgroup() { # instance_in_cgroup INSTANCE: its processes are in the supervisor unit's subtree
    sh_in "
        pid=\$(tenctl status $1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"pid\"] or \"\")')
        [ -n \"\$pid\" ] || { echo 'no pid for $1'; exit 1; }
        pids=\$pid; todo=\$pid
        while [ -n \"\$todo\" ]; do
            next=''; for p in \$todo; do c=\$(cat /proc/\$p/task/*/children 2>/dev/null); next=\"\$next \$c\"; done
            todo=\$(echo \$next); pids=\"\$pids \$todo\"
        done
        for p in \$pids; do
            cg=\$(grep '^0::' /proc/\$p/cgroup | cut -d: -f3-)
            echo \"\$p \$(tr '\\0' ' ' </proc/\$p/cmdline) -> \$cg\"
            case \$cg in /system.slice/tenement-supervisor.service|/system.slice/tenement-supervisor.service/*) ;; *) exit 1 ;; esac
        done
        [ \$(echo \$pids | wc -w) -ge 2 ] || { echo 'the instance has no app process'; exit 1; }"
}
check deb.instance_in_supervisor_cgroup instance_in_cgroup notes:alice
check deb.tenctl_wake_as_root sh_in 'tenctl wake notes:bob && tenctl ps'
check deb.tenctl_refused_unprivileged sh_in '
    out=$(setpriv --reuid=nobody --regid=nogroup --clear-groups tenctl wake notes:bob 2>&1); status=$?
    echo "exit $status: $out"
    [ $status -ne 0 ] && echo "$out" | grep -qi "permission"'
check deb.tenctl_admin_group_member sh_in '
    id e2e-admin >/dev/null 2>&1 || useradd --system --no-create-home --user-group --groups tenement-admin e2e-admin
    setpriv --reuid=e2e-admin --regid=e2e-admin --init-groups tenctl ps notes'
check deb.default_example_service sh_in '
    set -e
    tenctl add hello:demo
    curl -sS -f --max-time 30 -H "Host: demo.hello.localhost" http://127.0.0.1/ | grep -i "directory listing"'
# The strictest isolation the supervisor offers (seccomp filter, no network, namespaces)
# must work inside the unit's own sandbox.
check deb.sandbox_instance_serves sh_in '
    set -e
    token=$(curl -sS -f --max-time 30 -H "Host: carol.boxed.localhost" http://127.0.0.1/token)
    curl -sS -f --max-time 30 -H "Host: carol.boxed.localhost" -H "Authorization: Bearer $token" -d "boxed note" http://127.0.0.1/notes; echo
    tenctl status boxed:carol'
# `systemctl reload` with a service added: it must be served without restarting alice; a
# broken file must be refused with the old config left running.
reload_adds_service() {
    sh_in '
        set -e
        alice=$(tenctl status notes:alice --json | python3 -c "import json,sys; print(json.load(sys.stdin)[\"pid\"])")
        cp /etc/tenement/tenement.toml /root/tenement.toml.good
        printf "\n[service.extra]\ncommand = \"python3 -m http.server --bind 127.0.0.1 --directory {data_dir}/{id} {port}\"\n" >>/etc/tenement/tenement.toml
        systemctl reload tenement-supervisor.service
        tenctl add extra:dave
        curl -sS -f --max-time 30 -H "Host: dave.extra.localhost" http://127.0.0.1/ | grep -i "directory listing"
        after=$(tenctl status notes:alice --json | python3 -c "import json,sys; print(json.load(sys.stdin)[\"pid\"])")
        [ "$alice" = "$after" ] || { echo "alice was restarted by the reload ($alice -> $after)"; exit 1; }
        echo "bogus = 1" >>/etc/tenement/tenement.toml
        if systemctl reload tenement-supervisor.service; then echo "a broken config was accepted"; exit 1; fi
        systemctl -q is-active tenement-supervisor.service
        cp /root/tenement.toml.good /etc/tenement/tenement.toml
        printf "\n[service.extra]\ncommand = \"python3 -m http.server --bind 127.0.0.1 --directory {data_dir}/{id} {port}\"\n" >>/etc/tenement/tenement.toml
        curl -sS -f --max-time 30 -H "Host: alice.notes.localhost" http://127.0.0.1/ >/dev/null'
}
check deb.reload_adds_service reload_adds_service
check deb.journal_has_instance_lines sh_in '
    out=$(journalctl --no-pager -o cat TENEMENT_INSTANCE=notes:alice)
    echo "$out" | tail -5
    echo "$out" | grep -q "notes listening on" && echo "$out" | grep -qi "ready"'
# A reload that changes notes' definition is a release, rolled out: alice (running) is
# switched, which is one event in alice's journal and one entry of the supervisor's with its
# outcome as a field.
check deb.rollout_switch_in_journal sh_in '
    set -e
    curl -sS -f --max-time 30 -H "Host: alice.notes.localhost" http://127.0.0.1/ >/dev/null
    sed -i "/^\[service.notes\]\$/a stop_grace = \"9s\"" /etc/tenement/tenement.toml
    systemctl reload tenement-supervisor.service
    for i in $(seq 1 120); do
        if tenctl releases notes --json | python3 -c "import json,sys; d=json.load(sys.stdin); sys.exit(0 if (d.get(\"rollout\") or {}).get(\"state\") == \"done\" else 1)"; then break; fi
        sleep 0.5
    done
    tenctl releases notes
    journalctl --no-pager -o cat TENEMENT_INSTANCE=notes:alice | grep "switched from release 1 to 2"
    journalctl --no-pager -o cat -u tenement-supervisor F_OUTCOME=ok | grep "notes:alice"'
# The management API through the packaged proxy: a tenant token restarts its own instance,
# is refused another, the act is an audit event in the real journal with the token's public
# id as a field, and the secret is in neither the journal nor the registry file.
check deb.api_token_audited_never_logged sh_in '
    set -e
    token=$(tenctl token create --scope tenant:notes:alice --name rig)
    secret=${token##*_}
    id=$(echo "$token" | cut -d_ -f2)
    code=$(curl -sS -o /dev/null -w %{http_code} --max-time 60 -X POST -H "Host: localhost" -H "Authorization: Bearer $token" http://127.0.0.1/api/v1/instances/notes:alice/restart)
    echo "restart: $code"; [ "$code" = 200 ]
    code=$(curl -sS -o /dev/null -w %{http_code} --max-time 30 -H "Host: localhost" -H "Authorization: Bearer $token" http://127.0.0.1/api/v1/instances/notes:bob)
    echo "another tenant: $code"; [ "$code" = 403 ]
    journalctl --no-pager -o cat -u tenement-supervisor F_AUDIT_TOKEN=$id F_AUDIT_ACTION=restart | grep "restart notes:alice by token $id"
    if journalctl --no-pager -o cat | grep -qF "$secret"; then echo "the secret is in the journal"; exit 1; fi
    if grep -qF "$secret" /var/lib/tenement/state/registry.json; then echo "the secret is in the registry"; exit 1; fi
    grep -q "$id" /var/lib/tenement/state/registry.json'
dump_container_logs

stage "deb: restarts under load"
# A client sends requests one after another to alice while something disruptive happens;
# every answer must be a 200. The test waits for answers (events), not for seconds: some
# before the disruption, some after it, however slow the machine is. The loop stops when told
# (or after 10 minutes, should this script die without telling it).
start_client_loop() { # start_client_loop [HOST]
    local host=${1:-alice.notes.localhost}
    sh_in 'rm -f /tmp/loop-stop /tmp/loop-result /tmp/loop-failures /tmp/loop-progress
        nohup bash -c "end=\$((SECONDS + 600)); ok=0; bad=0
            while [ ! -e /tmp/loop-stop ] && [ \$SECONDS -lt \$end ]; do
                code=\$(curl -sS -o /dev/null -w %{http_code} --max-time 30 -H \"Host: '"$host"'\" http://127.0.0.1/ 2>/tmp/loop-curl-error)
                if [ \"\$code\" = 200 ]; then ok=\$((ok + 1)); else bad=\$((bad + 1)); echo \"\$(date \"+%F %T.%N\") \$code \$(cat /tmp/loop-curl-error)\" >>/tmp/loop-failures; fi
                echo \"\$ok \$bad\" >/tmp/loop-progress.new && mv /tmp/loop-progress.new /tmp/loop-progress
            done
            echo \"\$ok \$bad\" >/tmp/loop-result" >/dev/null 2>&1 &'
    wait_for_answers 5 || { end_client_loop; return 1; }
}
# wait_for_answers N: until the client loop has had N more 200s than when called (the
# deadline is generous: it only bounds a hang, every answer is checked by stop_client_loop).
wait_for_answers() {
    sh_in 'want='"$1"'; read -r ok0 _ 2>/dev/null </tmp/loop-progress || ok0=0
        end=$((SECONDS + 120))
        while [ $SECONDS -lt $end ]; do
            read -r ok bad 2>/dev/null </tmp/loop-progress || ok=0
            [ "$ok" -ge $((ok0 + want)) ] && exit 0
            sleep 0.1
        done
        echo "the client loop got fewer than $want more answers in 120 s (now: ${ok:-0} ok, ${bad:-0} not)"; exit 1'
}
# end_client_loop: tells the loop to stop and waits until it has (its request in progress has
# --max-time 30).
end_client_loop() {
    sh_in 'touch /tmp/loop-stop
        end=$((SECONDS + 60))
        while [ $SECONDS -lt $end ] && [ ! -s /tmp/loop-result ]; do sleep 0.1; done'
}
stop_client_loop() { # prints the counts; fails on any non-200 or no answers after the disruption
    local after=ok
    wait_for_answers 5 || after="no answers after the disruption"
    end_client_loop
    sh_in 'after="'"$after"'"
        read -r ok bad </tmp/loop-result || { echo "the client loop did not finish"; exit 1; }
        echo "$ok requests answered 200, $bad not"
        [ "$after" = ok ] || echo "$after"
        [ "$after" = ok ] && [ "$bad" = 0 ] && exit 0
        head -5 /tmp/loop-failures
        # What the daemons said around the first failure.
        at=$(head -1 /tmp/loop-failures | cut -c1-23)
        journalctl --no-pager -o short-precise --since "$(date -d "$at 3 seconds ago" "+%F %T")" \
            --until "$(date -d "$at 2 seconds" "+%F %T")" -u tenement-proxy.service \
            -u tenement-supervisor.service -u tenement.socket | grep -v "HTTP/1.1\" 200" | tail -40
        exit 1'
}
restarts_lose_no_request() {
    start_client_loop || return 1
    sh_in 'systemctl restart tenement-proxy.service' || echo "restart of the proxy failed"
    wait_for_answers 5 || echo "(checked below)"
    sh_in 'systemctl restart tenement-supervisor.service' || echo "restart of the supervisor failed"
    stop_client_loop
}
check deb.restarts_lose_no_request restarts_lose_no_request
# Installing the package over itself runs the upgrade path of the maintainer scripts: the
# sockets stay, the supervisor restarts, the proxy try-restarts.
supervisor_pid() { sh_in 'systemctl show -p MainPID --value tenement-supervisor.service'; }
restarted() { # restarted OLD_PID: the supervisor runs under another pid now
    local now
    now=$(supervisor_pid)
    echo "supervisor pid $1 -> $now"
    [ "$now" != "$1" ] && [ "$now" != 0 ]
}
upgrade_loses_no_request() {
    local before
    before=$(supervisor_pid)
    start_client_loop || return 1
    sh_in "dpkg -i /pkgs/$debname" || echo "dpkg -i over the installed package failed"
    stop_client_loop && restarted "$before" &&
        sh_in 'systemctl is-active tenement.socket tenement-supervisor.service tenement-proxy.service'
}
check deb.upgrade_loses_no_request upgrade_loses_no_request
# Stopped, the supervisor is started again by its sockets as soon as the proxy calls.
check deb.supervisor_socket_activated sh_in '
    systemctl stop tenement-supervisor.service 2>/dev/null
    systemctl is-active tenement-supervisor-proxy.socket tenement-supervisor-admin.socket || exit 1
    curl -sS -f --max-time 30 -o /dev/null -w "%{http_code} after the supervisor was stopped\n" -H "Host: alice.notes.localhost" http://127.0.0.1/ &&
    systemctl is-active tenement-supervisor.service'
check deb.proxy_has_no_privilege sh_in '
    pid=$(systemctl show -p MainPID --value tenement-proxy.service)
    [ "$pid" -gt 0 ] || { echo "the proxy is not running"; exit 1; }
    uid=$(id -u tenement-proxy)
    grep -E "^(Uid|Gid|Groups|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):" /proc/$pid/status
    grep -Eq "^Uid:\s+$uid\s+$uid\s+$uid\s+$uid$" /proc/$pid/status &&
    [ $(grep -Ec "^Cap(Inh|Prm|Eff|Bnd|Amb):\s+0+$" /proc/$pid/status) = 5 ] &&
    grep -Eq "^NoNewPrivs:\s+1$" /proc/$pid/status'
# The proxy fails at every start for 12 s (past systemd's default start limit of 5 in 10 s)
# while clients keep connecting; then it is fixed. Port 80 must never close and must
# answer again by itself, without an operator touching the socket.
proxy_crash_loop() {
    sh_in 'mkdir -p /run/systemd/system/tenement-proxy.service.d
        printf "[Service]\nExecStartPre=/bin/false\n" >/run/systemd/system/tenement-proxy.service.d/crash.conf
        systemctl daemon-reload && systemctl restart tenement-proxy.service; true'
    for _ in $(seq 1 12); do
        sh_in 'curl -s -o /dev/null --max-time 1 -H "Host: alice.notes.localhost" http://127.0.0.1/ &' >/dev/null 2>&1
        sleep 1
    done
    sh_in 'echo "proxy starts so far: $(systemctl show -p NRestarts --value tenement-proxy.service) restarts"
        echo "tenement.socket: $(systemctl is-active tenement.socket)"
        systemctl -q is-active tenement.socket || exit 1
        ss -Hltn "sport = :80" | grep -q LISTEN || { echo "nothing listens on port 80"; exit 1; }
        rm /run/systemd/system/tenement-proxy.service.d/crash.conf && systemctl daemon-reload
        # Generous: the start limit may hold the proxy back for its 10 s interval first.
        end=$((SECONDS + 120))
        while [ $SECONDS -lt $end ]; do
            code=$(curl -s -o /dev/null -w %{http_code} --max-time 30 -H "Host: alice.notes.localhost" http://127.0.0.1/)
            [ "$code" = 200 ] && { echo "answered 200 again after the fix"; exit 0; }
            sleep 0.2
        done
        echo "port 80 did not answer within 120 s of the fix (last: $code)"; exit 1'
}
check deb.proxy_crash_loop_keeps_port_80 proxy_crash_loop
# HTTPS as an operator turns it on: a certificate file in [settings.tls], then
# tenement-https.socket enabled. PID 1 holds 443 too; the proxy (still its own user, still no
# capability) serves the file's certificate there and redirects plain HTTP; its state
# directory is its own, 0700.
https_socket() {
    local tls=$root/etc/tenement/tls
    mkdir -p "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=test CA" \
        -keyout "$work/ca.key" -out "$tls/ca.pem" 2>/dev/null &&
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=notes" \
        -keyout "$tls/notes.key" -out "$work/notes.csr" 2>/dev/null &&
    printf 'subjectAltName=DNS:*.notes.localhost\n' >"$work/san.ext" &&
    openssl x509 -req -in "$work/notes.csr" -CA "$tls/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
        -days 2 -extfile "$work/san.ext" -out "$work/leaf.pem" 2>/dev/null &&
    cat "$work/leaf.pem" "$tls/ca.pem" >"$tls/notes.pem" || { echo "openssl failed"; return 1; }
    sh_in 'set -e
        chgrp tenement-proxy /etc/tenement/tls/notes.key && chmod 640 /etc/tenement/tls/notes.key
        printf "\n[settings.tls]\ncertificates = [{ cert = \"/etc/tenement/tls/notes.pem\", key = \"/etc/tenement/tls/notes.key\" }]\n" >>/etc/tenement/tenement.toml
        tenctl validate
        systemctl enable --now tenement-https.socket
        systemctl restart tenement-proxy.service
        ss -Hltnp "sport = :443"; ss -Hltnp "sport = :443" | grep -q "pid=1,"
        ss -Hltnp "sport = :80" | grep -q "pid=1,"
        code=$(curl -sS --max-time 30 --cacert /etc/tenement/tls/ca.pem --resolve alice.notes.localhost:443:127.0.0.1 \
            -o /dev/null -w "%{http_code} %{http_version}" https://alice.notes.localhost/)
        echo "https: $code"; [ "$code" = "200 2" ]
        code=$(curl -sS --max-time 30 -o /dev/null -w "%{http_code} %{redirect_url}" -H "Host: alice.notes.localhost" http://127.0.0.1/x)
        echo "http: $code"; [ "$code" = "308 https://alice.notes.localhost/x" ]
        pid=$(systemctl show -p MainPID --value tenement-proxy.service)
        grep -Eq "^Uid:\s+$(id -u tenement-proxy)\s" /proc/$pid/status
        [ $(grep -Ec "^Cap(Inh|Prm|Eff|Bnd|Amb):\s+0+$" /proc/$pid/status) = 5 ]
        stat -c "%n %a %U" /var/lib/tenement-proxy
        test "$(stat -c "%a %U" /var/lib/tenement-proxy)" = "700 tenement-proxy"
        echo "live exposure: $(systemd-analyze security tenement-proxy.service 2>/dev/null | tail -1)"
        ss -Hltnp "sport = :9464" | grep -q "127.0.0.1:9464.*pid=1,"
        out=$(curl -sS --max-time 30 http://127.0.0.1:9464/metrics)
        echo "$out" | grep -E "^tenement_(supervisor_up|tls_certificate_expiry)" | head -3
        echo "$out" | grep -q "^tenement_supervisor_up{daemon=\"supervisor\"} 1" &&
            echo "$out" | grep -q "^tenement_tls_certificate_expiry_timestamp_seconds{name=\"\*.notes.localhost\",source=\"file\"}" &&
            echo "$out" | grep -q "^tenement_process_resident_memory_bytes{daemon=\"supervisor\"} [1-9]" &&
            test -f /usr/share/tenement/prometheus/tenement.rules.yml &&
            test -f /usr/share/tenement/grafana/tenement.json
        score=$(systemd-analyze security tenement-proxy.service 2>/dev/null | sed -nE "s/.*Overall exposure level for [^:]+: ([0-9.]+).*/\1/p")
        awk -v s="$score" "BEGIN { exit !(s <= 2.0) }"'
}
check deb.https_socket_serves_a_file_certificate https_socket
# The certificate files are the operator's, which dpkg -P rightly keeps: gone before the purge.
rm -rf "$root/etc/tenement/tls"
dump_container_logs

stage "deb: remove and purge"
check deb.remove_stops_everything sh_in '
    dpkg -r tenement || exit 1
    for u in tenement.socket tenement-https.socket tenement-metrics.socket tenement-proxy.service tenement-supervisor.service tenement-supervisor-admin.socket tenement-supervisor-proxy.socket; do
        s=$(systemctl is-active $u); echo "$u: $s"; [ "$s" = active ] && exit 1
    done
    left=$(ps -eo pid,args | grep -E "tenement-|app.py|http.server" | grep -v grep); [ -z "$left" ] || { echo "left running: $left"; exit 1; }
    ss -Hltn "sport = :80" | grep -q . && { echo "port 80 still open"; exit 1; }
    ss -Hltn "sport = :443" | grep -q . && { echo "port 443 still open"; exit 1; }
    test -f /etc/tenement/tenement.toml && test -d /var/lib/tenement/state && getent passwd tenement-proxy >/dev/null'
check deb.purge_removes_config_data_users sh_in '
    dpkg -P tenement || exit 1
    for p in /etc/tenement /var/lib/tenement /var/lib/tenement-proxy /run/tenement; do [ -e $p ] && { echo "$p is still there"; exit 1; }; done
    for a in "passwd tenement-proxy" "group tenement-proxy" "group tenement-admin"; do getent $a && { echo "$a is still there"; exit 1; }; done
    true'
dump_container_logs
stage "deb: power off"
stop_all_containers

# ---- the .rpm, installed into a second root with rpm --root ----------------------------------
stage "rpm: install into root"
root=$work/rpm-root
unpack_root "$tarball" "$root"
mkdir -p "$root/pkgs"
cp "$rpm_file" "$root/pkgs/"
rpmname=$(basename "$rpm_file")
rpmdb="--dbpath /var/lib/rpm"
# rpm runs the scriptlets chrooted into the root: systemd-sysusers, systemd-tmpfiles and
# systemctl preset work offline there. --nodeps: the Debian root's own packages are not in
# an rpm database.
check rpm.install_into_root bash -c "rpm --root '$root' $rpmdb -i --nodeps '$rpm_file' &&
    rpm --root '$root' $rpmdb -q tenement"
stage "rpm: boot"
FAILED_IN_CONTAINER=
if ! boot "$root" tenement-rpm "$work/rpm-boot.log"; then
    echo "FAIL  booting the rpm container"
    tail -30 "$work/rpm-boot.log"
    failed=$((failed + 1))
    failures+=("booting the rpm container")
else
    L=$LEADER
    check rpm.socket_enabled sh_in 'test "$(systemctl is-enabled tenement.socket)" = enabled && systemctl is-active tenement.socket'
    check rpm.supervisor_active sh_in 'systemctl is-active tenement-supervisor.service tenement-supervisor-admin.socket tenement-supervisor-proxy.socket'
    check rpm.port_80_held_by_pid1 sh_in 'ss -Hltnp "sport = :80"; ss -Hltnp "sport = :80" | grep -q "pid=1,"; [ "$(systemctl is-active tenement-proxy.service)" = inactive ]'
    check rpm.wake_by_request sh_in '
        set -e
        tenctl add hello:demo
        curl -sS -f --max-time 30 -H "Host: demo.hello.localhost" http://127.0.0.1/ | grep -i "directory listing"
        systemctl is-active tenement-proxy.service'
    check rpm.tenctl_wake_as_root sh_in 'tenctl stop hello:demo && tenctl wake hello:demo'
    # rpm -U over itself: %post with $1=2, %postun with $1=1 (try-restart) in a live system.
    rpm_upgrade() {
        local before
        before=$(supervisor_pid)
        start_client_loop demo.hello.localhost || return 1
        sh_in "rpm $rpmdb -U --replacepkgs --nodeps /pkgs/$rpmname" || echo "rpm -U failed"
        stop_client_loop && restarted "$before" &&
            sh_in 'systemctl is-active tenement.socket tenement-supervisor.service'
    }
    check rpm.upgrade_loses_no_request rpm_upgrade
    check rpm.erase_stops_everything sh_in "
        rpm $rpmdb -e tenement || exit 1
        for u in tenement.socket tenement-https.socket tenement-metrics.socket tenement-proxy.service tenement-supervisor.service tenement-supervisor-admin.socket tenement-supervisor-proxy.socket; do
            s=\$(systemctl is-active \$u); echo \"\$u: \$s\"; [ \"\$s\" = active ] && exit 1
        done
        left=\$(ps -eo pid,args | grep -E 'tenement-|http.server' | grep -v grep); [ -z \"\$left\" ] || { echo \"left running: \$left\"; exit 1; }
        ss -Hltn 'sport = :80' | grep -q . && { echo 'port 80 still open'; exit 1; }
        for p in /usr/bin/tenement-supervisor /etc/systemd/system/sockets.target.wants/tenement.socket /etc/systemd/system/multi-user.target.wants/tenement-supervisor.service; do
            [ -e \$p ] || [ -L \$p ] && { echo \"\$p is still there\"; exit 1; }
        done; true"
    dump_container_logs
fi
stage "rpm: power off"
stop_all_containers
stage ""

printf '\n== timings\n'
printf '%s\n' "${timings[@]}"
echo "logs and build output: $work"
for f in "${failures[@]+"${failures[@]}"}"; do echo "FAILED: $f"; done
[ $xfailed -gt 0 ] && echo "$xfailed expected failures (PENDING in $0)"
echo "$passed passed, $failed failed"
[ $failed = 0 ]
