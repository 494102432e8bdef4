#!/usr/bin/env python3
"""OS noise on a Linux CPU and on an lwk partition CPU, measured in the same run.

    python3 bench/noise.py                       # target/release/lwk, 20000 quanta of 100 us
    python3 bench/noise.py --lwk target/debug/lwk --samples 2000

Creates a partition with CPU 1 (`lwk partition create NAME --cpus 1 --mem 64M
--hugepages none`), then starts a CPU-bound background load, which lands on
the Linux CPUs since the partition exists, and runs `lwk noise` (the fixed work
quantum benchmark) at the same time on CPU 0 (Linux, shared with the load) and
on CPU 1 (in the partition's cpuset). Prints a markdown section with both
tables and writes bench/noise.svg: the two charts one above the other.

The load is stopped and the partition destroyed on every path, also on
Ctrl-C and SIGTERM. Without `lwk partition` (not built into this lwk, or not
root) the comparison runs on Linux only, with the load pinned to CPU 0 and
CPU 1 an ordinary Linux CPU without load, and the output says so.

Needs root for the partition. Standard library only; uses stress-ng for the
load where installed, else a Python busy loop.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SVG_NS = "http://www.w3.org/2000/svg"
LINUX_CPU = 0
PARTITION_CPU = 1


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def partition_supported(lwk):
    """Whether this lwk has the partition subcommand, and why not if it hasn't."""
    p = run([lwk, "partition", "--help"])
    if p.returncode != 0:
        return False, "this lwk has no `partition` subcommand (`lwk partition --help` failed)"
    if os.geteuid() != 0:
        return False, "creating a partition needs root"
    return True, ""


def partition_cgroup_procs(lwk, name):
    """The file that moves a process into partition NAME's cpuset."""
    candidates = []
    p = run([lwk, "partition", "show", name, "--json"])
    if p.returncode == 0:
        try:
            shown = json.loads(p.stdout)
        except ValueError:
            shown = {}

        def strings(v):
            if isinstance(v, dict):
                for x in v.values():
                    yield from strings(x)
            elif isinstance(v, list):
                for x in v:
                    yield from strings(x)
            elif isinstance(v, str):
                yield v

        candidates += [Path(s) for s in strings(shown) if s.startswith("/sys/fs/cgroup") and s.endswith("/" + name)]
    # The layout lwk partition uses: R/lwk/NAME under the cpuset hierarchy's root.
    candidates += [Path("/sys/fs/cgroup/cpuset/lwk") / name, Path("/sys/fs/cgroup/lwk") / name]
    for d in candidates:
        if (d / "cgroup.procs").exists():
            return d / "cgroup.procs"
    raise RuntimeError(f"cannot find the cpuset cgroup of partition {name} (tried {', '.join(map(str, candidates))})")


class Load:
    """A CPU-bound background load: one worker, bounded in time by itself too."""

    def __init__(self, seconds, pin_cpu=None):
        self.seconds = seconds
        self.pin_cpu = pin_cpu
        self.proc = None
        if shutil.which("stress-ng"):
            self.cmd = ["stress-ng", "--cpu", "1", "--timeout", f"{seconds}s", "--quiet"]
            self.what = "stress-ng --cpu 1"
        else:
            busy = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
            self.cmd = [sys.executable, "-c", busy]
            self.what = "a Python busy loop (stress-ng is not installed)"
        if pin_cpu is not None:
            self.what += f", pinned to CPU {pin_cpu}"

    def __enter__(self):
        pin = self.pin_cpu
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as a whole
            preexec_fn=(lambda: os.sched_setaffinity(0, {pin})) if pin is not None else None,
        )
        return self

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        return False


def start_noise(lwk, cpu, args, out_dir, label, procs_file=None):
    json_path = out_dir / f"{label}.json"
    svg_path = out_dir / f"{label}.svg"
    cmd = [lwk, "noise", "--cpus", str(cpu), "--samples", str(args.samples), "--quantum-us", str(args.quantum_us),
           "--json", str(json_path), "--svg", str(svg_path)]
    if args.log_y:
        cmd.append("--log-y")

    def enter_partition():
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=enter_partition if procs_file else None)
    return proc, cmd, json_path, svg_path


def finish_noise(started):
    proc, cmd, json_path, svg_path = started
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
    return json.loads(json_path.read_text()), svg_path, " ".join(str(c) for c in cmd)


def combine_svgs(parts, path):
    """Stacks the charts one above the other in one SVG, each with a heading."""
    ET.register_namespace("", SVG_NS)
    heading = 34
    width, y = 0, 0
    outer = ET.Element(f"{{{SVG_NS}}}svg")
    for title, svg_path in parts:
        inner = ET.parse(svg_path).getroot()
        w, h = int(float(inner.get("width"))), int(float(inner.get("height")))
        text = ET.SubElement(outer, f"{{{SVG_NS}}}text", x="15", y=str(y + 24), **{"font-family": "sans-serif",
                             "font-size": "20", "font-weight": "bold"})
        text.text = title
        inner.set("x", "0")
        inner.set("y", str(y + heading))
        outer.append(inner)
        width, y = max(width, w), y + heading + h
    outer.set("width", str(width))
    outer.set("height", str(y))
    outer.set("viewBox", f"0 0 {width} {y}")
    background = ET.Element(f"{{{SVG_NS}}}rect", x="0", y="0", width=str(width), height=str(y), fill="#FFFFFF")
    outer.insert(0, background)
    ET.ElementTree(outer).write(path, encoding="utf-8", xml_declaration=False)


def table(rows):
    lines = ["| where | CPU | samples | min µs | median µs | p99 µs | max µs | noise % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for where, c in rows:
        lines.append(f"| {where} | {c['cpu']} | {c['samples']} | {c['min_us']:.3f} | {c['median_us']:.3f} | "
                     f"{c['p99_us']:.3f} | {c['max_us']:.1f} | {c['noise_percent']:.4f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lwk", default=str(ROOT / "target/release/lwk"), help="the lwk binary (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=20000, help="quanta per CPU (default: %(default)s)")
    ap.add_argument("--quantum-us", type=int, default=100, help="quantum in µs (default: %(default)s)")
    ap.add_argument("--svg", default=str(BENCH / "noise.svg"), help="the chart (default: %(default)s)")
    ap.add_argument("--log-y", action="store_true", help="logarithmic duration axis in the charts")
    ap.add_argument("--results", type=Path, metavar="FILE",
                    help="also put the section into FILE (e.g. bench/RESULTS.md), replacing the one there; "
                         "a new one goes inside the block bench/run.py keeps")
    args = ap.parse_args()

    lwk = str(Path(args.lwk).resolve())
    if not os.access(lwk, os.X_OK):
        sys.exit(f"noise.py: no lwk binary at {lwk}: build it (cargo build --release) or pass --lwk")
    if args.samples < 1 or args.quantum_us < 1:
        sys.exit("noise.py: --samples and --quantum-us must be at least 1")
    online = os.sched_getaffinity(0)
    if not {LINUX_CPU, PARTITION_CPU} <= online:
        sys.exit(f"noise.py: needs CPUs {LINUX_CPU} and {PARTITION_CPU} in its affinity mask, has {sorted(online)}")

    # SIGTERM unwinds like Ctrl-C, so that every `finally` below runs.
    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)

    supported, why_not = partition_supported(lwk)
    name = f"noise-bench-{os.getpid()}"
    created = False
    notes = []
    # The load must outlast both measurements even on a loaded machine; it
    # is stopped as soon as they are done.
    load_seconds = max(60, int(args.samples * args.quantum_us * 4 / 1e6) + 60)
    with tempfile.TemporaryDirectory(prefix="lwk-noise-") as tmp:
        tmp = Path(tmp)
        try:
            procs_file = None
            if supported:
                p = run([lwk, "partition", "create", name, "--cpus", str(PARTITION_CPU), "--mem", "64M",
                         "--hugepages", "none"])
                if p.returncode == 0:
                    created = True
                    procs_file = partition_cgroup_procs(lwk, name)
                else:
                    why_not = f"`lwk partition create` failed: {p.stderr.strip()}"
            if created:
                second = f"in partition `{name}`"
                load = Load(load_seconds)  # started now: lands on the Linux CPUs
            else:
                notes.append(f"No partition: {why_not}. Both CPUs are Linux CPUs; the load is pinned to CPU "
                             f"{LINUX_CPU} and CPU {PARTITION_CPU} runs without it.")
                second = "Linux, without load"
                load = Load(load_seconds, pin_cpu=LINUX_CPU)
            first = "Linux, with load"
            with load:
                started = []
                try:
                    started.append(start_noise(lwk, LINUX_CPU, args, tmp, "linux"))
                    started.append(start_noise(lwk, PARTITION_CPU, args, tmp,
                                               "partition" if created else "linux-idle", procs_file))
                    linux_report, linux_svg, linux_cmd = finish_noise(started[0])
                    other_report, other_svg, other_cmd = finish_noise(started[1])
                finally:
                    for proc, *_ in started:
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
        finally:
            if created:
                d = run([lwk, "partition", "destroy", name])
                if d.returncode != 0:
                    print(f"noise.py: `lwk partition destroy {name}` failed: {d.stderr.strip()}", file=sys.stderr)
        combine_svgs([(f"CPU {LINUX_CPU}: {first}", linux_svg),
                      (f"CPU {PARTITION_CPU}: {second.replace('`', '')}", other_svg)], args.svg)

    rows = [(first, linux_report["cpus"][0]), (second, other_report["cpus"][0])]
    a, b = rows[0][1]["noise_percent"], rows[1][1]["noise_percent"]
    ratio = f"{a / b:.1f}x" if b > 0 else "infinite (no noise measured on the second CPU)"
    out = ["## OS noise: fixed work quantum (FWQ)\n",
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
           f"kernel {platform.release()}, {os.cpu_count()} CPUs. {args.samples} quanta of {args.quantum_us} µs per "
           f"CPU, both CPUs measured at the same time, background load: {load.what}.\n"]
    out += [f"**{n}**\n" for n in notes]
    out.append(table(rows))
    svg = Path(args.svg).resolve()
    shown = svg.relative_to(ROOT) if svg.is_relative_to(ROOT) else svg
    out.append(f"\nNoise fraction on CPU {LINUX_CPU} / on CPU {PARTITION_CPU}: {ratio}. Chart: `{shown}`.\n")
    out.append(f"Commands: `{linux_cmd.replace(str(tmp), '$TMP')}` and "
               f"`{other_cmd.replace(str(tmp), '$TMP')}`" + (f" (in partition {name}'s cpuset)" if created else "")
               + f"; made by `python3 bench/noise.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.")
    section = "\n".join(out)
    print(section)
    if args.results:
        put_section(args.results, section)


NOISE_BEGIN = "<!-- noise:begin (written by bench/noise.py --results) -->"
NOISE_END = "<!-- noise:end -->"
ANALYSIS_END = "<!-- analysis:end -->"


def put_section(path, section):
    """Replace the noise block in `path`, or add one just inside the end of
    the block that bench/run.py keeps across runs (or at the end)."""
    text = path.read_text() if path.exists() else ""
    block = f"{NOISE_BEGIN}\n{section}\n{NOISE_END}"
    if NOISE_BEGIN in text and NOISE_END in text:
        head, rest = text.split(NOISE_BEGIN, 1)
        text = head + block + rest.split(NOISE_END, 1)[1]
    elif ANALYSIS_END in text:
        text = text.replace(ANALYSIS_END, f"{block}\n\n{ANALYSIS_END}", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("noise.py: interrupted; load stopped, partition destroyed")
    except RuntimeError as e:
        sys.exit(f"noise.py: {e}")
