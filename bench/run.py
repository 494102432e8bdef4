#!/usr/bin/env python3
"""lwk benchmark suite: native versus `lwk run`, measured in the same run.

    python3 bench/run.py                 # full run, writes bench/RESULTS.md
    python3 bench/run.py --quick         # smoke run (CI): small sizes, few reps
    python3 bench/run.py --only getpid   # one benchmark (or a comma list)

Builds lwk (cargo build --release) and the C microbenchmarks in bench/src
(gcc -O2, into bench/build/, git-ignored), then runs every benchmark natively
and under lwk, interleaved round by round, several repetitions, and reports
medians. Ratios are always lwk / native from this very run.

Only the full run (no --quick, no --only) writes bench/RESULTS.md; other runs
write bench/build/RESULTS-partial.md unless --output says otherwise. A block
between the analysis markers in the existing output file is kept across runs
(it is written by hand, after looking at the numbers).

The first-touch benchmark with 2 MiB pages reserves a hugetlb pool (as an
lwk partition would) by writing /proc/sys/vm/nr_hugepages, and always puts
the original value back, also on Ctrl-C or SIGTERM.

Standard library only. Exit status: 0 when every benchmark ran (missed aims
are not failures), 1 when a run failed (lwk crashed, wrong output, ...).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SRC = BENCH / "src"
BUILD = BENCH / "build"
# The binaries the benchmarks run: copied here after the build, so that a
# rebuild of target/release by someone else during the run cannot change them.
BIN = BUILD / "bin"
LWK = BIN / "lwk"
RESULTS = BENCH / "RESULTS.md"
PARTIAL = BUILD / "RESULTS-partial.md"
ANALYSIS_BEGIN = "<!-- analysis:begin (kept across runs by bench/run.py) -->"
ANALYSIS_END = "<!-- analysis:end -->"

MIB = 1 << 20
GIB = 1 << 30
HUGE_PAGE = 2 * MIB
HUGE_HEADROOM = 64 * MIB
OTHER_LOAD_WARN = 0.10  # share of all CPUs used by other work that makes a result unreliable  # the program's own text, heap, stack on 2 MiB pages

C_PROGRAMS = ["getppid_loop", "getpid_loop", "delegated_loop", "first_touch", "sud_floor", "thread_create",
              "futex_pingpong", "fork_exec", "spawn_exec"]

# name -> one-line description (also the order of the table)
BENCHMARKS = {
    "getppid": "syscall(SYS_getppid) loop, ns per call",
    "delegated": "syscall(SYS_fcntl, fd, F_GETFD) loop, ns per call (truly delegated)",
    "getpid": "syscall(SYS_getpid) loop, ns per call (local in the LWK)",
    "first_touch": "mmap 1 GiB (quick: 256 MiB) anonymous + write one byte per 4 KiB page",
    "thread_create": "pthread_create + pthread_join, one thread at a time, ns per thread",
    "futex": "futex ping-pong between two threads, ns per round trip",
    "fork_exec": "fork + execve /bin/true + waitpid, ns per process",
    "spawn_exec": "posix_spawn /bin/true + waitpid (vfork path), ns per process",
    "make": "make -j2 of a small C project (7 files), wall time",
    "true": "/bin/true: lwk start-up and tear-down cost (information, no aim)",
    "python": "/usr/bin/python3 -c pass start-up",
    "py_subprocess": "python3 running subprocess.run(['/bin/true']) 20 times (vfork from a large parent)",
    "sha256sum": "sha256sum of a 256 MiB (quick: 32 MiB) file",
}


class RunFailed(Exception):
    pass


def log(msg=""):
    print(msg, flush=True)


# --------------------------------------------------------------------------
# helpers


def sh(argv, **kw):
    return subprocess.run(argv, check=False, **kw)


def tail(text, n=12):
    lines = (text or "").strip().splitlines()
    return "\n".join(lines[-n:])


def run_checked(argv, timeout, what):
    """Run argv, capture output; raise RunFailed with details on failure."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RunFailed(f"{what}: timed out after {timeout} s: {shlex.join(argv)}\n"
                        f"stderr: {tail(e.stderr if isinstance(e.stderr, str) else '')}")
    if p.returncode != 0:
        sig = ""
        if p.returncode < 0:
            sig = f" (killed by signal {signal.Signals(-p.returncode).name})"
        raise RunFailed(f"{what}: exit status {p.returncode}{sig}: {shlex.join(argv)}\n"
                        f"stdout: {tail(p.stdout, 4)}\nstderr: {tail(p.stderr)}")
    return p


def parse_kv(stdout, key, what):
    for line in reversed(stdout.splitlines()):
        if f"{key}=" in line:
            return {k: v for k, v in (tok.split("=", 1) for tok in line.split() if "=" in tok)}
    raise RunFailed(f"{what}: no '{key}=' line in output:\n{tail(stdout)}")


def median(xs):
    return statistics.median(xs) if xs else None


def fmt_ns(ns):
    if ns is None:
        return "-"
    return f"{ns:,.0f} ns" if ns >= 100 else f"{ns:.1f} ns"


def fmt_s(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.3f} s"


def read_int(path):
    return int(Path(path).read_text().strip())


# --------------------------------------------------------------------------
# hugetlb pool


def hugepage_paths():
    """(nr_hugepages file to write, free_hugepages file) for 2 MiB pages."""
    sysfs = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
    default_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                default_kb = int(line.split()[1])
    except OSError:
        pass
    nr = Path("/proc/sys/vm/nr_hugepages") if default_kb == 2048 else sysfs / "nr_hugepages"
    return nr, sysfs / "free_hugepages"


class HugePool:
    """Reserve `need` free 2 MiB pages for the duration of a `with` block.

    Always writes the original nr_hugepages back on exit (normal, exception,
    KeyboardInterrupt); signals are held off while restoring. `skip` is set
    to a reason when the pool could not be had.
    """

    def __init__(self, need):
        self.need = need
        self.nr_path, self.free_path = hugepage_paths()
        self.orig = None
        self.changed = False
        self.skip = None
        self.got_free = None
        self.topups = 0

    def __enter__(self):
        try:
            self.orig = read_int(self.nr_path)
            free = read_int(self.free_path)
        except OSError as e:
            self.skip = f"no 2 MiB hugetlb pool on this kernel ({e})"
            return self
        if free >= self.need:
            self.got_free = free
            return self
        if os.geteuid() != 0:
            self.skip = (f"not root: cannot reserve {self.need} 2 MiB pages in {self.nr_path} "
                         f"(free: {free})")
            return self
        target = self.orig + (self.need - free)
        try:
            self.changed = True  # from here on, restore whatever happens
            self.nr_path.write_text(f"{target}\n")
        except OSError as e:
            self.skip = f"writing {target} to {self.nr_path} failed: {e}"
            return self
        self.got_free = read_int(self.free_path)
        if self.got_free < self.need:
            self.skip = (f"the kernel gave fewer pages than asked: {self.got_free} free 2 MiB pages, "
                         f"{self.need} needed (nr_hugepages {read_int(self.nr_path)} of {target} asked)")
        log(f"  hugetlb pool: nr_hugepages {self.orig} -> {read_int(self.nr_path)}, "
            f"{self.got_free} free (need {self.need})")
        return self

    def ensure(self):
        """Top the pool up again if someone else took free pages meanwhile

        (any concurrent `lwk run --hugepages auto` does: the pool is global).
        Returns a note when it had to, else None."""
        if self.skip is not None:
            return None
        free = read_int(self.free_path)
        if free >= self.need:
            return None
        if os.geteuid() != 0:
            return f"only {free} free 2 MiB pages left (taken by other processes), cannot top up: not root"
        cur = read_int(self.nr_path)
        self.changed = True
        self.nr_path.write_text(f"{cur + self.need - free}\n")
        got = read_int(self.free_path)
        self.topups += 1
        msg = (f"pool topped up: {free} free 2 MiB pages left (others took them), "
               f"nr_hugepages {cur} -> {read_int(self.nr_path)}, {got} free")
        log("  " + msg)
        return None if got >= self.need else msg

    def __exit__(self, *exc):
        if not self.changed:
            return False
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for attempt in range(50):
                try:
                    self.nr_path.write_text(f"{self.orig}\n")
                except OSError as e:
                    log(f"  WARNING: restoring {self.nr_path} to {self.orig}: {e}")
                now = read_int(self.nr_path)
                if now == self.orig:
                    break
                time.sleep(0.1)  # pages still held by a dying child
            log(f"  hugetlb pool: nr_hugepages restored to {read_int(self.nr_path)} (was {self.orig})")
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        return False


# --------------------------------------------------------------------------
# build


def build(args):
    """Build lwk (the work tree, or --rev REV from git), snapshot the binaries
    into bench/build/bin/, and compile the C programs. Returns a description
    of what is being measured."""
    if args.rev:
        sha = sh(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{args.rev}^{{commit}}"],
                 capture_output=True, text=True).stdout.strip()
        if not sha:
            sys.exit(f"--rev {args.rev}: not a commit")
        src = BUILD / f"rev-{sha[:12]}"
        if not src.exists():
            tmp = BUILD / f"rev-{sha[:12]}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", sha], stdout=subprocess.PIPE)
            # -m: files get the time of extraction, so cargo never mistakes a changed
            # file (whose commit time may be older than the last build) for fresh
            tar = subprocess.run(["tar", "-x", "-m", "-C", str(tmp)], stdin=archive.stdout)
            archive.stdout.close()
            if archive.wait() != 0 or tar.returncode != 0:
                sys.exit(f"git archive {sha} failed")
            tmp.rename(src)
        for old in BUILD.glob("rev-*"):  # keep only the revision measured now
            if old != src:
                shutil.rmtree(old, ignore_errors=True)
        target = BUILD / "target-rev"
        cargo = ["cargo", "build", "--release", "--target-dir", str(target)]
        built = target / "release"
        what = f"commit {sha[:12]} (`--rev {args.rev}`, built from git archive)"
    else:
        src, built = ROOT, ROOT / "target" / "release"
        cargo = ["cargo", "build", "--release"]
        commit = sh(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                    capture_output=True, text=True).stdout.strip()
        dirty = sh(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", ":!bench"],
                   capture_output=True, text=True).stdout.strip()
        what = f"work tree at commit {commit}" + (" **with uncommitted changes outside bench/**" if dirty else "")
    BUILD.mkdir(exist_ok=True)
    if not args.no_build:
        log(f"building lwk: {shlex.join(cargo)} (in {src})")
        t = time.perf_counter()
        p = sh(cargo, cwd=src, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{shlex.join(cargo)} failed:\n{tail(p.stderr, 40)}")
        log(f"  done in {time.perf_counter() - t:.1f} s")
    BIN.mkdir(exist_ok=True)
    for name in ("lwk", "lwk-kernel"):
        if not (built / name).exists():
            sys.exit(f"{built / name} missing (build lwk first)")
        tmp = BIN / f".{name}.tmp"
        shutil.copy2(built / name, tmp)
        os.replace(tmp, BIN / name)
    log(f"lwk binaries ({what}) snapshot in {BIN.relative_to(ROOT)}/")
    for prog in C_PROGRAMS:
        out = BUILD / prog
        argv = ["gcc", "-O2", "-Wall", "-pthread", "-o", str(out), str(SRC / f"{prog}.c")]
        p = sh(argv, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{shlex.join(argv)} failed:\n{p.stderr}")
    log(f"built {', '.join(C_PROGRAMS)} into {BUILD.relative_to(ROOT)}/ (gcc -O2)")
    return what


def lwk_cmd(argv, hugepages=None, stats_json=None):
    cmd = [str(LWK), "run"]
    if hugepages:
        cmd += ["--hugepages", hugepages]
    if stats_json:
        cmd += ["--stats-json", str(stats_json)]
    return cmd + ["--"] + list(argv)


class OtherLoad:
    """How much CPU other work (not this script and its children) used.

    System-wide busy time from /proc/stat minus the CPU time of our own
    waited-for descendants, as a share of all CPUs over the wall time."""

    def __enter__(self):
        self.t = time.perf_counter()
        self.busy = self._busy()
        self.own = self._own()
        self.share = None
        return self

    @staticmethod
    def _busy():
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own():
        c, s = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        return c.ru_utime + c.ru_stime + s.ru_utime + s.ru_stime

    def __exit__(self, *exc):
        busy = self._busy()
        wall = time.perf_counter() - self.t
        if busy is not None and self.busy is not None and wall > 0:
            other = (busy - self.busy) - (self._own() - self.own)
            self.share = max(0.0, other / (wall * (os.cpu_count() or 1)))
        return False


def rotated(items, r):
    r %= len(items)
    return items[r:] + items[:r]


# --------------------------------------------------------------------------
# benchmarks. Each returns a list of result rows (dicts).


def row(bench, label, native, lwk, unit, aim=None, aim_text="-", note="", **extra):
    ratio = lwk / native if (native and lwk is not None) else None
    met = None if (aim is None or ratio is None) else ratio <= aim
    return dict(bench=bench, label=label, native=native, lwk=lwk, unit=unit, ratio=ratio,
                aim=aim, aim_text=aim_text, met=met, note=note, **extra)


def bench_micro(name, prog, label, aim, aim_text, cfg, note="", extra=None):
    """ns per call of a syscall loop, native vs lwk, interleaved.

    `extra` maps more variant names to a program in bench/build run natively
    with the lwk iteration count (reported in the details, not the ratio)."""
    n_native, n_lwk = cfg["micro_n_native"], cfg["micro_n_lwk"]
    variants = {
        "native": [str(BUILD / prog), str(n_native)],
        "lwk": lwk_cmd([str(BUILD / prog), str(n_lwk)]),
    }
    for v, p in (extra or {}).items():
        variants[v] = [str(BUILD / p), str(n_lwk)]
    samples = {k: [] for k in variants}
    for r in range(-1, cfg["reps"]):  # round -1 is a discarded warm-up
        for v in rotated(list(variants), max(r, 0)):
            out = run_checked(variants[v], 600, f"{name} ({v})").stdout
            ns = float(parse_kv(out, "ns_per_op", f"{name} ({v})")["ns_per_op"])
            if r >= 0:
                samples[v].append(ns)
        if r >= 0:
            log(f"  round {r + 1}: " + ", ".join(f"{v} {samples[v][-1]:.1f} ns" for v in variants))
    return [row(name, label, median(samples["native"]), median(samples["lwk"]), "ns", aim, aim_text,
                note=note, samples=samples, medians={v: median(xs) for v, xs in samples.items()},
                detail=f"iterations per run: native {n_native:,}, lwk {n_lwk:,}")]


def bench_first_touch(cfg):
    size = cfg["touch_bytes"]
    need = -(-(size + HUGE_HEADROOM) // HUGE_PAGE)
    prog = [str(BUILD / "first_touch"), str(size)]
    size_txt = f"{size // GIB} GiB" if size >= GIB else f"{size // MIB} MiB"
    rows = []
    with HugePool(need) as pool:
        variants = {"native": prog}
        if pool.skip is None:
            variants["lwk 2M"] = lwk_cmd(prog, hugepages="2M")
        variants["lwk none"] = lwk_cmd(prog, hugepages="none")
        samples = {v: [] for v in variants}
        for r in range(-1, cfg["reps"]):
            for v in rotated(list(variants), max(r, 0)):
                if v == "lwk 2M":
                    short = pool.ensure()
                    if short:
                        raise RunFailed(f"first_touch ({v}): {short}")
                out = run_checked(variants[v], 600, f"first_touch ({v})").stdout
                kv = parse_kv(out, "mmap_touch_s", f"first_touch ({v})")
                if r >= 0:
                    samples[v].append({k: float(kv[k]) for k in ("mmap_touch_s", "mmap_s", "touch_s", "munmap_s")})
            if r >= 0:
                log("  round %d: " % (r + 1) + ", ".join(
                    f"{v} {samples[v][-1]['mmap_touch_s']:.3f} s" for v in variants))
    med = {v: {k: median([s[k] for s in samples[v]]) for k in samples[v][0]} for v in samples}
    nat = med["native"]["mmap_touch_s"]
    breakdown = {v: med[v] for v in med}
    if pool.skip is None:
        rows.append(row("first_touch", f"first touch {size_txt}, lwk --hugepages 2M", nat,
                        med["lwk 2M"]["mmap_touch_s"], "s", 0.5, "<= 0.5x (2x faster)",
                        samples={v: [s["mmap_touch_s"] for s in samples[v]] for v in ("native", "lwk 2M")},
                        breakdown=breakdown, pool_pages=need, pool_topups=pool.topups))
    else:
        rows.append(row("first_touch", f"first touch {size_txt}, lwk --hugepages 2M", nat, None, "s",
                        0.5, "<= 0.5x (2x faster)", note=f"SKIPPED: {pool.skip}", skipped=True,
                        breakdown=breakdown))
    rows.append(row("first_touch", f"first touch {size_txt}, lwk --hugepages none (4 KiB memfd)", nat,
                    med["lwk none"]["mmap_touch_s"], "s", None, "(reported beside)",
                    samples={v: [s["mmap_touch_s"] for s in samples[v]] for v in ("native", "lwk none")},
                    breakdown=breakdown))
    return rows


def time_whole(name, argv, cfg, rounds, runs, warmup):
    """Wall-clock seconds of native argv vs lwk argv, interleaved by rounds.

    hyperfine (-N, no shell) when installed, else time.perf_counter. Returns
    (samples by variant, cpu seconds per run by variant, tool)."""
    variants = {"native": list(argv), "lwk": lwk_cmd(argv)}
    samples = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    hyperfine = shutil.which("hyperfine")
    tool = "hyperfine -N" if hyperfine else "time.perf_counter"
    with tempfile.TemporaryDirectory(prefix="lwk-bench-hf-") as td:
        for r in range(rounds):
            w = warmup if (r == 0 or cfg["warmup_every_round"].get(name, False)) else 0
            for v in rotated(list(variants), r):
                cmd = variants[v]
                if hyperfine:
                    js = Path(td) / "hf.json"
                    hf = [hyperfine, "-N", "--style", "none", "--warmup", str(w), "--runs", str(runs),
                          "--export-json", str(js), "--", shlex.join(cmd)]
                    run_checked(hf, 1800, f"{name} ({v}) under hyperfine")
                    res = json.loads(js.read_text())["results"][0]
                    samples[v] += res["times"]
                    cpu[v].append(res["user"] + res["system"])
                else:
                    for _ in range(w):
                        run_checked(cmd, 600, f"{name} ({v}) warm-up")
                    for _ in range(runs):
                        before = resource.getrusage(resource.RUSAGE_CHILDREN)
                        t = time.perf_counter()
                        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                           timeout=600)
                        dt = time.perf_counter() - t
                        after = resource.getrusage(resource.RUSAGE_CHILDREN)
                        if p.returncode != 0:
                            raise RunFailed(f"{name} ({v}): exit status {p.returncode}: {shlex.join(cmd)}\n"
                                            f"stderr: {tail(p.stderr)}")
                        samples[v].append(dt)
                        cpu[v].append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
            log(f"  round {r + 1}: native {fmt_s(median(samples['native'][-runs:]))}, "
                f"lwk {fmt_s(median(samples['lwk'][-runs:]))}")
    return samples, cpu, tool


def lwk_stats(name, argv, expect_stdout=None):
    """One extra lwk run with --stats-json; check its output if asked."""
    with tempfile.TemporaryDirectory(prefix="lwk-bench-st-") as td:
        js = Path(td) / "stats.json"
        p = run_checked(lwk_cmd(argv, stats_json=js), 600, f"{name} (lwk --stats-json)")
        if expect_stdout is not None and p.stdout != expect_stdout:
            raise RunFailed(f"{name}: output under lwk differs from native:\n"
                            f"native: {expect_stdout!r}\nlwk:    {p.stdout!r}")
        if not js.exists():
            raise RunFailed(f"{name}: lwk wrote no --stats-json file")
        return json.loads(js.read_text())


def bench_whole(name, label, argv, cfg, rounds, runs, warmup, aim=1.5, aim_text="<= 1.5x", expect=None, note=""):
    native_out = run_checked(argv, 600, f"{name} (native check)").stdout
    if expect is not None and native_out != expect:
        raise RunFailed(f"{name}: native output {native_out!r}, expected {expect!r}")
    samples, cpu, tool = time_whole(name, argv, cfg, rounds, runs, warmup)
    stats = lwk_stats(name, argv, expect_stdout=native_out)
    return [row(name, label, median(samples["native"]), median(samples["lwk"]), "s", aim, aim_text,
                note=note, samples=samples, stats=stats, tool=tool,
                cpu={v: median(c) for v, c in cpu.items()},
                detail=f"{len(samples['native'])} runs each, {tool}")]


def bench_make(cfg):
    """make -j2 of a small C project from a clean tree, native vs lwk."""
    tmp = Path(tempfile.mkdtemp(prefix="lwk-bench-make-"))
    try:
        for i in range(1, 7):
            (tmp / f"f{i}.c").write_text(f"int f{i}(int x) {{ return x * {i}; }}\n")
        (tmp / "main.c").write_text(
            "#include <stdio.h>\nint f1(int), f2(int), f3(int), f4(int), f5(int), f6(int);\n"
            "int main(void) { printf(\"%d\\n\", f1(1) + f2(2) + f3(3) + f4(4) + f5(5) + f6(6)); return 0; }\n")
        (tmp / "Makefile").write_text(
            "OBJS = main.o f1.o f2.o f3.o f4.o f5.o f6.o\nprog: $(OBJS)\n\tgcc -o $@ $(OBJS)\n"
            "%.o: %.c\n\tgcc -O1 -c $< -o $@\nclean:\n\trm -f *.o prog\n")
        samples = {"native": [], "lwk": []}
        variants = {"native": ["make", "-s", "-j2", "-C", str(tmp)], "lwk": lwk_cmd(["make", "-s", "-j2", "-C", str(tmp)])}
        for r in range(-1, cfg["reps"]):
            for v in rotated(list(variants), max(r, 0)):
                subprocess.run(["make", "-s", "-C", str(tmp), "clean"], check=True)
                t = time.perf_counter()
                run_checked(variants[v], 600, f"make ({v})")
                dt = time.perf_counter() - t
                if r >= 0:
                    samples[v].append(dt)
            if r >= 0:
                log(f"  round {r + 1}: native {samples['native'][-1] * 1e3:.0f} ms, lwk {samples['lwk'][-1] * 1e3:.0f} ms")
        return [row("make", "make -j2 of a 7-file C project", median(samples["native"]), median(samples["lwk"]), "s",
                    None, "-", samples=samples, medians={v: median(xs) for v, xs in samples.items()})]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_sha256(cfg):
    size = cfg["sha_bytes"]
    td = tempfile.mkdtemp(prefix="lwk-bench-sha-")
    try:
        path = Path(td) / "data.bin"
        # deterministic content: a 1 MiB block from SHAKE-256, its index mixed in
        import hashlib
        base = hashlib.shake_256(b"lwk bench sha256sum input").digest(MIB)
        h = hashlib.sha256()
        with open(path, "wb") as f:
            for i in range(size // MIB):
                blk = i.to_bytes(8, "little") + base[8:]
                f.write(blk)
                h.update(blk)
        expect = f"{h.hexdigest()}  {path}\n"
        size_txt = f"{size // MIB} MiB"
        return bench_whole("sha256sum", f"sha256sum of a {size_txt} file", ["/usr/bin/sha256sum", str(path)], cfg,
                           rounds=cfg["reps"], runs=1, warmup=1, expect=expect)
    finally:
        shutil.rmtree(td, ignore_errors=True)


# --------------------------------------------------------------------------
# report


def machine_info():
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    hf = shutil.which("hyperfine")
    hfv = sh([hf, "--version"], capture_output=True, text=True).stdout.strip() if hf else "not installed"
    nr, free = hugepage_paths()
    try:
        pool = f"{read_int(nr)} pages, {read_int(free)} free"
    except OSError:
        pool = "?"
    return {
        "nproc": os.cpu_count(),
        "model": model,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "memory": mem,
        "hyperfine": hfv,
        "pool": pool,
        "load": load_text(),
    }


def load_text():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def fmt_val(v, unit):
    if v is None:
        return "-"
    return fmt_ns(v) if unit == "ns" else fmt_s(v)


def table(rows):
    out = ["| benchmark | native | lwk | ratio (lwk/native) | aim | met? |",
           "|---|---:|---:|---:|---|---|"]
    for r in rows:
        if r.get("failed"):
            out.append(f"| {r['label']} | - | - | - | {r['aim_text']} | FAILED (see below) |")
            continue
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if r.get("skipped"):
            met = "skipped"
        elif r["met"] is None:
            met = "-"
        else:
            met = "yes" if r["met"] else "**no**"
        if (r.get("other_load") or 0) > OTHER_LOAD_WARN:
            met += " (disturbed)"
        out.append(f"| {r['label']} | {fmt_val(r['native'], r['unit'])} | {fmt_val(r['lwk'], r['unit'])} "
                   f"| {ratio} | {r['aim_text']} | {met} |")
    return "\n".join(out)


def details(rows, cfg):
    out = []
    for r in rows:
        if r.get("failed"):
            out.append(f"* **{r['label']}: FAILED**\n\n```\n{r['error']}\n```")
            continue
        bits = []
        if r.get("note"):
            bits.append(r["note"])
        if r.get("detail"):
            bits.append(r["detail"])
        if r.get("samples"):
            for v, xs in r["samples"].items():
                bits.append(f"{v}: " + ", ".join(fmt_val(x, r["unit"]) for x in xs[:12])
                            + (" ..." if len(xs) > 12 else ""))
        if r.get("medians") and len(r["medians"]) > 2:
            bits.append("medians: " + ", ".join(f"{v} {fmt_val(x, r['unit'])}" for v, x in r["medians"].items()))
        if r.get("cpu"):
            bits.append("CPU time (user+sys) per run: " + ", ".join(
                f"{v} {fmt_s(c)}" for v, c in r["cpu"].items()))
        if r.get("other_load") is not None:
            ol = r["other_load"]
            bits.append(f"other work on the machine meanwhile: {ol:.0%} of the CPUs"
                        + (" (**disturbed: unreliable**)" if ol > OTHER_LOAD_WARN else ""))
        out.append(f"* **{r['label']}**: " + "; ".join(bits))
    bd = next((r["breakdown"] for r in rows if r.get("breakdown")), None)
    if bd:
        out.append("")
        out.append("First-touch breakdown (medians; under lwk mmap pre-faults, so the cost moves from "
                   "touch into mmap):")
        out.append("")
        out.append("| variant | mmap | touch | mmap+touch | munmap |")
        out.append("|---|---:|---:|---:|---:|")
        for v, m in bd.items():
            out.append(f"| {v} | {fmt_s(m['mmap_s'])} | {fmt_s(m['touch_s'])} | {fmt_s(m['mmap_touch_s'])} "
                       f"| {fmt_s(m['munmap_s'])} |")
        pool_row = next((r for r in rows if r.get("pool_pages")), None)
        if pool_row:
            out.append("")
            out.append(f"The 2 MiB run had a hugetlb pool of {pool_row['pool_pages']} pages reserved for it "
                       f"(size + 64 MiB headroom); nr_hugepages was restored afterwards.")
            if pool_row.get("pool_topups"):
                out.append(f"Other processes took free pages from the pool during the run (any `lwk run` with "
                           f"the default `--hugepages auto` does); it was topped up {pool_row['pool_topups']} "
                           f"time(s) before a 2 MiB run.")
    return "\n".join(out)


def where_time_goes(rows):
    out = []
    trap = next((r for r in rows if r["bench"] == "getpid" and not r.get("failed")), None)
    for r in rows:
        st = r.get("stats")
        if not st:
            continue
        out.append(f"**{r['label']}** under lwk (`--stats-json`, one extra run): "
                   f"{st['syscalls_total']} system calls, {st['syscalls_local']} local, "
                   f"{st['syscalls_delegated']} delegated; wall {fmt_s(st['wall_ns'] / 1e9)} as seen by lwk; "
                   f"memory peak {st['memory_peak_bytes'] // 1024} KiB; pages {st['huge_pages']}.")
        if trap and trap["lwk"]:
            est = st["syscalls_total"] * trap["lwk"] * 1e-9
            out.append(f"Trap cost alone at the measured local-call price ({fmt_ns(trap['lwk'])}): "
                       f"about {fmt_s(est)}.")
        out.append("")
        out.append("| syscall | where | count | total | mean |")
        out.append("|---|---|---:|---:|---:|")
        for s in st["syscalls"][:5]:
            out.append(f"| {s['name']} | {s['where']} | {s['count']} | {fmt_s(s['total_ns'] / 1e9)} "
                       f"| {s['mean_ns'] / 1e3:.2f} µs |")
        out.append("")
    if out:
        out.insert(0, "Top 5 system calls by total time in the LWK's handler (the trap entry/exit itself, "
                      "~2-3 µs each, is not in these totals).\n")
    return "\n".join(out)


def old_analysis(path):
    try:
        text = path.read_text()
    except OSError:
        return None
    a, b = text.find(ANALYSIS_BEGIN), text.find(ANALYSIS_END)
    if a < 0 or b < a:
        return None
    return text[a + len(ANALYSIS_BEGIN):b].strip("\n")


def report(rows, info, cfg, command, elapsed, out_path):
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "# lwk benchmark results",
        "",
        f"Produced by `{command}` on {now}; the whole run took {elapsed:.0f} s."
        + (" **Quick mode: smoke-test sizes, not comparable with a full run.**" if cfg["quick"] else ""),
        "",
        "Machine: "
        f"{info['nproc']} CPUs, {info['model']}, {info['memory']}, {info['kernel']}. "
        f"lwk measured: {info['lwk']}; hyperfine: {info['hyperfine']}; "
        f"2 MiB hugetlb pool outside the first-touch benchmark: {info['pool']}. "
        f"Load average (1, 5, 15 min) at start: {info['load']}, at end: {load_text()} "
        f"(anything well above 0 means other work shared the {info['nproc']} CPUs).",
        "",
        "Every benchmark runs natively and under `lwk run` in the same run, interleaved round by round "
        f"({cfg['reps']} rounds after a discarded warm-up; values are medians). Ratio = lwk / native. "
        "lwk runs other than first touch use the default `--hugepages auto`.",
        "",
        "## Results",
        "",
        table(rows),
        "",
        "## Details",
        "",
        details(rows, cfg),
        "",
        "## Where the time goes: system calls of the whole programs",
        "",
        where_time_goes(rows) or "_(no whole-program benchmark in this run)_",
        "",
        "## Where the time goes: analysis",
        "",
        ANALYSIS_BEGIN,
        old_analysis(out_path) or "_Not written yet: look at the numbers above and write it here._",
        ANALYSIS_END,
        "",
    ]
    text = "\n".join(parts)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return text


# --------------------------------------------------------------------------


def config(args):
    q = args.quick
    reps = args.reps or (3 if q else 5)
    return {
        "quick": q,
        "reps": reps,
        "micro_n_native": 200_000 if q else 2_000_000,
        "micro_n_lwk": 20_000 if q else 200_000,
        "touch_bytes": 256 * MIB if q else GIB,
        "sha_bytes": 32 * MIB if q else 256 * MIB,
        "python_runs": 3 if q else 10,
        "true_runs": 3 if q else 10,
        "warmup_every_round": {"python": True, "true": True},
    }


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="benchmarks: " + ", ".join(BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="small sizes and few repetitions (CI smoke run)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only these benchmarks (repeat or comma-separate): " + ", ".join(BENCHMARKS))
    ap.add_argument("--reps", type=int, default=0, help="rounds per benchmark (default 5, quick 3)")
    ap.add_argument("--no-build", action="store_true", help="skip cargo build (still compiles the C programs)")
    ap.add_argument("--rev", metavar="REV",
                    help="measure this git commit (git archive into bench/build/, own target dir) instead of "
                         "the work tree; useful while others edit the work tree")
    ap.add_argument("--output", type=Path, help="report file (default bench/RESULTS.md for a full run, "
                                                 "else bench/build/RESULTS-partial.md)")
    args = ap.parse_args()
    only = [n.strip() for o in args.only for n in o.split(",") if n.strip()]
    for n in only:
        if n not in BENCHMARKS:
            ap.error(f"unknown benchmark {n!r}; known: {', '.join(BENCHMARKS)}")
    selected = [n for n in BENCHMARKS if not only or n in only]
    cfg = config(args)
    out_path = args.output or (RESULTS if not (args.quick or only) else PARTIAL)
    script = os.path.relpath(__file__)
    command = shlex.join(["python3", script] + sys.argv[1:])

    # Ctrl-C, kill, a closed terminal: all end the run through the finally
    # blocks (the hugetlb pool is restored). SIGINT explicitly too, since a
    # background job starts with it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)
    t_start = time.perf_counter()
    what = build(args)
    info = machine_info()
    info["lwk"] = what

    plan = {
        "getppid": lambda: bench_micro(
            "getppid", "getppid_loop", "getppid round trip (the issue's 'delegated' call; answered by the LWK)",
            30, "<= 30x", cfg,
            note="`lwk syscalls` shows getppid answered by the LWK's own handler: this measures a trap + LWK handler, not delegation"),
        "delegated": lambda: bench_micro(
            "delegated", "delegated_loop", "delegated round trip: fcntl(F_GETFD)", 30, "<= 30x", cfg,
            note="fcntl is delegated to the proxy (the fd table lives there)"),
        "getpid": lambda: bench_micro(
            "getpid", "getpid_loop", "local call: getpid", 13, "<= 13x", cfg,
            note="also run: sud_floor, Syscall User Dispatch with an empty SIGSYS handler and no lwk "
                 "(the floor of any SUD-based design)",
            extra={"SUD floor (no lwk)": "sud_floor"}),
        "first_touch": lambda: bench_first_touch(cfg),
        "thread_create": lambda: bench_micro(
            "thread_create", "thread_create", "thread create + join", None, "-", cfg,
            note="under lwk each thread also gets (and gives back) a proxy worker of its own"),
        "fork_exec": lambda: bench_micro(
            "fork_exec", "fork_exec", "fork + exec + wait of /bin/true", None, "-", cfg,
            note="under lwk the child copies its memory at fork, its proxy forks too, /bin/true starts a new LWK image"),
        "spawn_exec": lambda: bench_micro(
            "spawn_exec", "spawn_exec", "posix_spawn + wait of /bin/true", None, "-", cfg,
            note="clone(CLONE_VM|CLONE_VFORK): the child shares the parent's memory until execve, nothing copied"),
        "make": lambda: bench_make(cfg),
        "futex": lambda: bench_micro(
            "futex", "futex_pingpong", "futex ping-pong round trip (2 threads)", None, "-", cfg,
            note="futex is local in the LWK: both threads are in the application process"),
        "true": lambda: bench_whole("true", "/bin/true (start-up cost, information)", ["/bin/true"], cfg,
                                    rounds=cfg["reps"], runs=cfg["true_runs"], warmup=1, aim=None, aim_text="-"),
        "python": lambda: bench_whole("python", "`python3 -c pass` start-up", ["/usr/bin/python3", "-c", "pass"],
                                      cfg, rounds=cfg["reps"], runs=cfg["python_runs"], warmup=1),
        "py_subprocess": lambda: bench_whole(
            "py_subprocess", "python3: 20 x subprocess.run(['/bin/true'])",
            ["/usr/bin/python3", "-c", "import subprocess\nfor _ in range(20): subprocess.run(['/bin/true'])"],
            cfg, rounds=cfg["reps"], runs=cfg["true_runs"], warmup=1, aim=None, aim_text="-",
            note="CPython's subprocess uses vfork: under lwk the child shares the parent's memory until its execve"),
        "sha256sum": lambda: bench_sha256(cfg),
    }
    rows = []
    failed = False
    try:
        for name in selected:
            log(f"== {name}: {BENCHMARKS[name]}")
            t = time.perf_counter()
            new = []
            with OtherLoad() as load:
                try:
                    new = plan[name]()
                except RunFailed as e:
                    failed = True
                    log(f"  FAILED: {e}")
                    new = [dict(bench=name, label=name, failed=True, error=str(e), aim_text="-")]
            for r in new:
                r["other_load"] = load.share
            rows += new
            other = "" if load.share is None else f"; other work used {load.share:.0%} of the CPUs"
            if load.share is not None and load.share > OTHER_LOAD_WARN:
                other += " -- DISTURBED, numbers unreliable"
            log(f"  ({time.perf_counter() - t:.1f} s{other})")
    except KeyboardInterrupt:
        log("\ninterrupted: report not written")
        return 130
    elapsed = time.perf_counter() - t_start
    report(rows, info, cfg, command, elapsed, out_path)
    log("")
    log(table(rows))
    log("")
    log(f"total time {elapsed:.0f} s; report written to {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
