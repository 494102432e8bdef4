#!/usr/bin/env bash
# End-to-end test of the lwk SPANK plugin against a real Slurm (Debian's
# slurm-wlm 22.05 and munge), started here on this one host and stopped again
# whatever happens. Needs root, slurmctld, slurmd, srun, munged, python3, and
# built binaries: target/debug/{lwk,lwk-kernel,lwk-slurm-exec,liblwk_slurm.so}
# (`cargo build -p lwk -p lwk-slurm`; BIN_DIR=... to use others).
#
# Prints "ok - ..." / "not ok - ..." per check and closes with
# "slurm totals: N passed, M failed"; exits non-zero if any check failed.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/debug}
LWK=$BIN_DIR/lwk
PLUGIN=$BIN_DIR/liblwk_slurm.so
HELPER=$BIN_DIR/lwk-slurm-exec
PARTS_DIR=/run/lwk/partitions
STATE_DIR=/run/lwk/slurm

passed=0
failed=0
ok() { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }
check() { # check NAME COMMAND...: passes when COMMAND succeeds
    local name=$1
    shift
    if "$@"; then ok "$name"; else not_ok "$name"; fi
}
finish() {
    echo "slurm totals: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit $?
}

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/slurm/run.sh: must run as root (it starts munged, slurmctld and slurmd)" >&2
    not_ok "running as root"
    finish
fi
for f in "$LWK" "$BIN_DIR/lwk-kernel" "$PLUGIN" "$HELPER"; do
    if [ ! -x "$f" ] && [ ! -f "$f" ]; then
        echo "tests/slurm/run.sh: $f missing: cargo build -p lwk -p lwk-slurm" >&2
        not_ok "built binaries present ($f)"
        finish
    fi
done
for p in slurmctld slurmd srun sbatch scancel scontrol sinfo munged python3; do
    if ! command -v "$p" >/dev/null; then
        echo "tests/slurm/run.sh: $p not installed (apt-get install slurm-wlm munge python3)" >&2
        not_ok "$p installed"
        finish
    fi
done

T=$(mktemp -d /tmp/lwk-slurm-test.XXXXXX)
chmod 755 "$T"
hugepages_before=$(cat /proc/sys/vm/nr_hugepages)
parts_before=$(ls -A "$PARTS_DIR" 2>/dev/null | grep -c '^slurm-' || true)

stop_pidfile() { # stop the daemon whose pid is in $1, SIGKILL after 10 s
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
}
cleanup() {
    set +e
    if [ -f "$T/slurmctld.pid" ]; then
        SLURM_CONF=$T/slurm.conf scancel --quiet --full --signal=KILL --user=root 2>/dev/null
        SLURM_CONF=$T/slurm.conf scancel --quiet --user=root 2>/dev/null
        for _ in $(seq 50); do
            [ -z "$(SLURM_CONF=$T/slurm.conf squeue -h 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pidfile "$T/slurmd.pid"
    stop_pidfile "$T/slurmctld.pid"
    stop_pidfile "$T/munged.pid"
    # Whatever a failing plugin left: this test's jobs' partitions and state.
    for p in $(ls -A "$PARTS_DIR" 2>/dev/null | grep '^slurm-'); do
        "$LWK" partition destroy --force "$p" >/dev/null 2>&1
    done
    for d in "$STATE_DIR"/*; do [ -e "$d" ] && rm -rf "$d"; done
    rmdir "$STATE_DIR" 2>/dev/null
    [ -n "${TEST_USER_MADE:-}" ] && userdel "$TEST_USER" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# --- configuration -----------------------------------------------------------
HOST=$(hostname -s)
# Online CPUs, not nproc: a partition of someone else confines this shell.
NCPUS=$(getconf _NPROCESSORS_ONLN)
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
mkdir -p "$T/state" "$T/spool" "$T/munge" "$T/munge-run" "$T/accounting"
# The key stays root's; the socket must be reachable by a job's user.
chmod 700 "$T/munge"
chmod 755 "$T/munge-run"

cat >"$T/plugstack.conf" <<EOF
required $PLUGIN lwk=$LWK exec_helper=$HELPER default_mem=128M max_mem_fraction=0.5 hugepages=none accounting_dir=$T/accounting
EOF
cat >"$T/slurm.conf" <<EOF
ClusterName=lwktest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SrunPortRange=60001-60100
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$T/munge-run/munge.sock
CredType=cred/munge
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
SlurmctldDebug=info
SlurmdDebug=debug
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/linear
SchedulerType=sched/builtin
PlugStackConfig=$T/plugstack.conf
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$T/slurm.conf

# --- start munged, slurmctld, slurmd -------------------------------------------
dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$T/munge/munge.key"
munged --force --key-file="$T/munge/munge.key" --socket="$T/munge-run/munge.sock" \
    --pid-file="$T/munged.pid" --seed-file="$T/munge/seed" --log-file="$T/munged.log" ||
    { not_ok "munged starts"; cat "$T/munged.log" 2>/dev/null; finish; }
slurmctld -f "$T/slurm.conf" -i || { not_ok "slurmctld starts"; cat "$T/slurmctld.log"; finish; }
slurmd -f "$T/slurm.conf" -N "$HOST" || { not_ok "slurmd starts"; cat "$T/slurmd.log"; finish; }

state=""
for _ in $(seq 120); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null)
    [ "$state" = idle ] && break
    sleep 0.5
done
if [ "$state" != idle ]; then
    not_ok "node $HOST idle (state: ${state:-none})"
    tail -n 30 "$T/slurmctld.log" "$T/slurmd.log"
    finish
fi
ok "slurmctld and slurmd up, node $HOST idle"

dump_logs() {
    tail -n 60 "$T/slurmd.log"
    # KEEP_LOGS=DIR keeps the daemons' logs of a failed run.
    [ -n "${KEEP_LOGS:-}" ] && mkdir -p "$KEEP_LOGS" && cp "$T"/*.log "$KEEP_LOGS"/
}
acct_field() { # acct_field JOBID PYTHON-EXPR-ON-d
    python3 -c "import json,sys; d=json.load(open('$T/accounting/$1.json')); print($2)" 2>/dev/null
}
wait_job_done() { # wait_job_done JOBID: until the job left squeue (its steps' exit callbacks ran) and its
    # partitions are gone, at most 60 s; a step's exit callback runs after srun has returned
    for _ in $(seq 240); do
        [ -z "$(squeue -h -j "$1" 2>/dev/null)" ] && nothing_left "$1" && return 0
        sleep 0.25
    done
    return 1
}
nothing_left() { # nothing_left JOBID: no partition, no state, hugepages as before
    local left
    [ "$1" != none ] || return 1
    left=$(ls -A "$PARTS_DIR" 2>/dev/null | grep -c "^slurm-$1\." || true)
    [ "$left" -eq 0 ] && [ ! -e "$STATE_DIR" -o -z "$(ls -A "$STATE_DIR" 2>/dev/null)" ] &&
        [ "$(cat /proc/sys/vm/nr_hugepages)" = "$hugepages_before" ] &&
        ! "$LWK" partition list 2>/dev/null | grep -q "slurm-$1\."
}

# --- 1. a normal step --------------------------------------------------------
prog='import os; print(6*7); print("job", os.environ["SLURM_JOB_ID"]); print("cpus", ",".join(map(str, sorted(os.sched_getaffinity(0)))))'
out=$(timeout 120 srun --lwk --lwk-cpus=1 --lwk-mem=256M python3 -c "$prog" 2>&1)
rc=$?
echo "$out" | sed 's/^/  | /'
job=$(echo "$out" | awk '/^job / { print $2 }')
wait_job_done "${job:-none}"
last_cpu=$((NCPUS - 1))
check "srun --lwk --lwk-cpus=1 --lwk-mem=256M python3 prints 42 (exit $rc)" \
    bash -c '[ "$0" -eq 0 ] && grep -qx 42 <<<"$1"' "$rc" "$out"
check "the task ran on the partition's CPU ($last_cpu, the job's last)" grep -qx "cpus $last_cpu" <<<"$out"
if [ -n "$job" ] && [ -f "$T/accounting/$job.json" ]; then
    ok "accounting written to accounting_dir/$job.json"
    sed 's/^/  | /' "$T/accounting/$job.json" | head -n 40
    check "accounting: 1 task, exit 0, syscalls local and delegated, memory high-water" \
        test "$(acct_field "$job" '(d["totals"]["tasks"], d["totals"]["exit_statuses"], d["totals"]["syscalls_local"] > 100, d["totals"]["syscalls_delegated"] > 10, d["totals"]["memory_peak_bytes_max"] > 1<<20)')" \
        = "(1, {'0': 1}, True, True, True)"
    check "accounting: step ran on partition slurm-$job.0 with CPU $last_cpu" \
        test "$(acct_field "$job" '[(s["partition"], s["cpus"]) for s in d["steps"].values()]')" = "[('slurm-$job.0', '$last_cpu')]"
    comment=$(scontrol show job "$job" 2>/dev/null | grep -o 'Comment=.*')
    echo "  | $comment"
    check "job comment carries the LWK totals" grep -q "Comment=lwk: tasks=1 syscalls_local=[1-9]" <<<"$comment"
else
    not_ok "accounting written for job '${job:-?}'"
    dump_logs
fi
check "partition of job ${job:-?} gone, /run/lwk/slurm empty, nr_hugepages back" nothing_left "${job:-none}"

# --- 1b. an ordinary user's job ----------------------------------------------
# The partition is the job user's: lwk run, which opens its memory, cgroup
# and lock, runs as that user.
TEST_USER=lwk-slurm-test
if ! id "$TEST_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$TEST_USER" && TEST_USER_MADE=1
fi
uid=$(id -u "$TEST_USER")
prog='import os; print("uid", os.getuid()); print("job", os.environ["SLURM_JOB_ID"]); print("cpus", ",".join(map(str, sorted(os.sched_getaffinity(0))))); st = os.stat("/run/lwk/partitions/slurm-%s.0/mem" % os.environ["SLURM_JOB_ID"]); print("mem owner", st.st_uid)'
out=$(cd "$T" && timeout 120 runuser -u "$TEST_USER" -- srun --lwk --lwk-cpus=1 --lwk-mem=64M python3 -c "$prog" 2>&1)
rc=$?
echo "$out" | sed 's/^/  | /'
job=$(echo "$out" | awk '/^job / { print $2 }')
wait_job_done "${job:-none}"
check "a job of user $TEST_USER (uid $uid) runs under lwk as that user on CPU $last_cpu (exit $rc)" \
    bash -c '[ "$0" -eq 0 ] && grep -qx "uid $1" <<<"$2" && grep -qx "cpus $3" <<<"$2"' "$rc" "$uid" "$out" "$last_cpu"
check "its partition's memory belongs to the job's user" grep -qx "mem owner $uid" <<<"$out"
check "accounting of $TEST_USER's job: 1 task, exit 0, syscalls counted" \
    test "$(acct_field "${job:-none}" '(d["totals"]["tasks"], d["totals"]["exit_statuses"], d["totals"]["syscalls_local"] > 100)')" \
    = "(1, {'0': 1}, True)"
check "partition of $TEST_USER's job ${job:-?} gone, nothing left" nothing_left "${job:-none}"

# --- 2. a task that crashes ---------------------------------------------------
out=$(timeout 120 srun --lwk --lwk-cpus=1 sh -c 'echo job $SLURM_JOB_ID; kill -SEGV $$' 2>&1)
rc=$?
echo "$out" | sed 's/^/  | /'
job=$(echo "$out" | awk '/^job / { print $2 }')
wait_job_done "${job:-none}"
check "a crashing task fails the step with its signal (srun exit $rc)" \
    bash -c '[ "$0" -ne 0 ] && grep -q "Segmentation fault" <<<"$1"' "$rc" "$out"
check "accounting of the crash: signal 11" \
    test "$(acct_field "${job:-none}" 'd["totals"]["exit_statuses"]')" = "{'sig11': 1}"
check "partition of crashed job ${job:-?} gone, nothing left" nothing_left "${job:-none}"

# --- 3. a batch job whose step runs in the job's partition; cancelled -------
# The script runs on Linux's CPUs; `srun` inside it runs its task under lwk in
# the partition made for the batch step.
job=$(sbatch --parsable --lwk --lwk-cpus=1 --lwk-mem=64M -o "$T/batch-%j.out" \
    --wrap 'srun python3 -c "import os; print(\"step cpus\", sorted(os.sched_getaffinity(0)))"; srun sleep 600' 2>&1)
echo "  | sbatch: $job"
running=""
for _ in $(seq 120); do
    if [ -d "$PARTS_DIR/slurm-$job.batch" ] && [ -n "$(squeue -h -s -j "$job" -o %i 2>/dev/null | grep "^$job\.1$")" ] &&
        "$LWK" partition list 2>/dev/null | grep "^slurm-$job.batch " | grep -q "pid [0-9]"; then
        running=yes
        break
    fi
    sleep 0.5
done
check "sbatch --lwk job $job: its second step runs under lwk run on partition slurm-$job.batch" test -n "$running"
check "the batch job's first step ran on the partition's CPU" grep -qx "step cpus \[$last_cpu\]" "$T/batch-$job.out"
scancel "$job"
gone=""
wait_job_done "$job" && gone=yes
check "scancel $job: job ended, its partition gone, nothing left" test -n "$gone"
statuses=$(acct_field "$job" '[(k, s["totals"]["exit_statuses"]) for k, s in sorted(d["steps"].items())]')
check "accounting of the batch job: step 0 exit 0, step 1 killed by a signal ($statuses)" \
    test "$(acct_field "$job" '(d["steps"]["0@'"$HOST"'"]["totals"]["exit_statuses"], all(k.startswith("sig") for k in d["steps"]["1@'"$HOST"'"]["totals"]["exit_statuses"]))')" = "({'0': 1}, True)"

# --- 3b. slurmstepd killed: the job epilog cleans up --------------------------
job=$(sbatch --parsable --lwk --lwk-cpus=1 --lwk-mem=64M -o "$T/killed-%j.out" --wrap 'srun sleep 600' 2>&1)
echo "  | sbatch: $job"
stepd=""
for _ in $(seq 120); do
    if "$LWK" partition list 2>/dev/null | grep "^slurm-$job.batch " | grep -q "pid [0-9]"; then
        stepd=$(pgrep -f "^slurmstepd: \[$job\.0\]" | head -n 1)
        [ -n "$stepd" ] && break
    fi
    sleep 0.5
done
echo "  | slurmstepd of step $job.0: ${stepd:-not found}"
[ -n "$stepd" ] && kill -9 "$stepd"
sleep 1
scancel "$job"
gone=""
wait_job_done "$job" && gone=yes
check "slurmstepd of step $job.0 killed (kill -9), job cancelled: the epilog left nothing" \
    bash -c '[ -n "$0" ] && [ -n "$1" ]' "$stepd" "$gone"
# Slurm's own srun client of the killed step may stay (proctrack/linuxproc
# lost it with its slurmstepd): not lwk's, but this test's to remove.
pkill -9 -f '^srun sleep 600' 2>/dev/null

# --- 4. bad requests give clear errors and change nothing ----------------------
out=$(timeout 60 srun --lwk-mem=lots true 2>&1)
rc=$?
echo "$out" | sed 's/^/  | /'
check "srun --lwk-mem=lots is refused, naming the option" \
    bash -c '[ "$0" -ne 0 ] && grep -q -- "--lwk-mem=lots" <<<"$1"' "$rc" "$out"
out=$(timeout 60 srun --lwk-cpus=$NCPUS true 2>&1)
rc=$?
echo "$out" | sed 's/^/  | /'
check "srun --lwk-cpus=$NCPUS (every CPU) is refused: one must stay with Linux" \
    bash -c '[ "$0" -ne 0 ] && grep -q "one must stay with Linux" <<<"$1"' "$rc" "$out"
out=$(timeout 60 srun --lwk --lwk-mem=100G true 2>&1)
rc=$?
echo "$out" | sed 's/^/  | /'
check "srun --lwk-mem=100G (over max_mem_fraction) is refused" \
    bash -c '[ "$0" -ne 0 ] && grep -q "max_mem_fraction" <<<"$1"' "$rc" "$out"

# Site policy: plugstack.conf is read by every srun and slurmstepd, so a
# changed file applies to the next job without restarting slurmd.
cp "$T/plugstack.conf" "$T/plugstack.conf.orig"
sed -i 's/$/ allow_users=lwk-nobody-here allow_groups=lwk-no-group/' "$T/plugstack.conf"
out=$(timeout 60 srun --lwk true 2>&1)
rc=$?
echo "$out" | sed 's/^/  | /'
check "allow_users/allow_groups: root is refused at submission, told who may" \
    bash -c '[ "$0" -ne 0 ] && grep -q "user root may not use --lwk" <<<"$1"' "$rc" "$out"
sed -i 's/ allow_users=.*$/ colour=blue/' "$T/plugstack.conf"
out=$(timeout 60 srun true 2>&1)
rc=$?
echo "$out" | sed 's/^/  | /'
check "an unknown plugstack.conf argument is named in the error" \
    bash -c '[ "$0" -ne 0 ] && grep -q "unknown argument \"colour\"" <<<"$1"' "$rc" "$out"
mv "$T/plugstack.conf.orig" "$T/plugstack.conf"

parts_after=$(ls -A "$PARTS_DIR" 2>/dev/null | grep -c '^slurm-' || true)
# No process of any job left: applications under lwk and their proxies
# (lwk-kernel images), or lwk run itself, found by the job id in their
# environment.
leftover=""
for p in $(ls /proc | grep -E '^[0-9]+$'); do
    exe=$(readlink "/proc/$p/exe" 2>/dev/null)
    case "$exe" in */lwk-kernel | */lwk) ;; *) continue ;; esac
    if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -q '^SLURM_JOB_ID=' &&
        [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ]; then
        leftover="$leftover $p:$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-40)"
    fi
done
check "no process of a job left (${leftover:-none})" test -z "$leftover"
check "no slurm partition left at all ($parts_before before, $parts_after after)" test "$parts_after" -eq "$parts_before"
[ "$failed" -eq 0 ] || dump_logs
finish
