#!/usr/bin/env python3
"""Migration benchmark: `lwk migrate` between two namespace nodes.

    sudo python3 bench/migrate.py            # writes bench/MIGRATE.md
    sudo python3 bench/migrate.py --quick    # 64 MiB only, no file written

Builds lwk (cargo build --release) and bench/src/memhog.c, makes two
network namespaces (node A and node B, a veth link, 198.18.0.0/24), starts
a node daemon in B, and for each memory size and each link (unshaped, and
shaped to 1 Gbit/s with tc tbf on A's side) runs memhog under `lwk run` in
A, migrates it to B and reads the report of `lwk migrate --json`: the
freeze (stop the threads, capture, transfer, restore) and the total. The
program then checks its whole memory in B and must say "ok".

What the issue measures this against: total time within 1.5x of the bytes
sent / link rate on the shaped link, and a freeze under 200 ms for 1 GiB.
Memory goes ahead while the program runs (pre-copy, rounds of what was
written since); the freeze carries the rest and the state.

Standard library only; needs root (namespaces), iproute2 and gcc. Removes
its namespaces on every exit path.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "bench" / "build"
A_ADDR, B_ADDR = "198.18.0.1", "198.18.0.2"
RATE_BITS = 1_000_000_000


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, **kw)


class Nodes:
    def __init__(self, lwk, state):
        pid = os.getpid()
        self.a, self.b = f"lwk-bench-a-{pid}", f"lwk-bench-b-{pid}"
        self.va, self.vb = f"ba{pid}", f"bb{pid}"
        self.lwk, self.state = lwk, state
        self.daemon = None

    def __enter__(self):
        sh("ip", "netns", "add", self.a)
        sh("ip", "netns", "add", self.b)
        sh("ip", "link", "add", self.va, "type", "veth", "peer", "name", self.vb)
        sh("ip", "link", "set", self.va, "netns", self.a)
        sh("ip", "link", "set", self.vb, "netns", self.b)
        sh("ip", "-n", self.a, "addr", "add", f"{A_ADDR}/24", "dev", self.va)
        sh("ip", "-n", self.b, "addr", "add", f"{B_ADDR}/24", "dev", self.vb)
        for ns, dev in ((self.a, self.va), (self.b, self.vb)):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.key = self.state / "cluster.key"
        sh(str(self.lwk), "node", "keygen", str(self.key), stdout=subprocess.DEVNULL)
        self.log = open(self.state / "daemon.log", "w")
        self.daemon = subprocess.Popen(
            ["ip", "netns", "exec", self.b, str(self.lwk), "node", "serve", "--listen", f"{B_ADDR}:7070",
             "--key", str(self.key), "--state-dir", str(self.state / "node")],
            stderr=self.log)
        deadline = time.time() + 10
        while "listening" not in (self.state / "daemon.log").read_text():
            if time.time() > deadline:
                raise RuntimeError("the node daemon did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        if self.daemon:
            self.daemon.kill()
            self.daemon.wait()
        sh("ip", "netns", "delete", self.a, check=False)
        sh("ip", "netns", "delete", self.b, check=False)

    def shape(self, on):
        if on:
            sh("tc", "-n", self.a, "qdisc", "replace", "dev", self.va, "root", "tbf", "rate", "1gbit",
               "burst", "1mb", "latency", "50ms")
        else:
            sh("tc", "-n", self.a, "qdisc", "del", "dev", self.va, "root", check=False,
               stderr=subprocess.DEVNULL)

    def migrate_once(self, memhog, mib, seconds):
        app = subprocess.Popen(["ip", "netns", "exec", self.a, str(self.lwk), "run", "--", str(memhog),
                                str(mib), str(seconds)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True)
        try:
            if app.stdout.readline() != b"ready\n":
                raise RuntimeError("memhog did not start")
            pid = json.loads(sh(str(self.lwk), "ps", "--json", capture_output=True).stdout)
            pid = next(a["pid"] for a in pid if a["command"].startswith(str(memhog)))
            before = set((self.state / "node").glob("*.log")) if (self.state / "node").exists() else set()
            t = time.monotonic()
            r = sh("ip", "netns", "exec", self.a, str(self.lwk), "migrate", str(pid), "--to", B_ADDR,
                   "--key", str(self.key), "--json", capture_output=True, check=False)
            wall = time.monotonic() - t
            if r.returncode != 0:
                raise RuntimeError(f"lwk migrate failed: {r.stderr.decode()}")
            report = json.loads(r.stdout)
            report["wall_ms"] = wall * 1e3
            app.wait()
            # memhog checks its memory in B and ends; its output is kept there.
            deadline = time.time() + seconds + 60
            while True:
                logs = set((self.state / "node").glob("*.log")) - before
                if logs:
                    out = next(iter(logs)).read_text()
                    break
                if time.time() > deadline:
                    raise RuntimeError("memhog did not end in B")
                time.sleep(0.05)
            report["check"] = out.strip()
            return report
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lwk", help="an lwk binary to use instead of building one")
    ap.add_argument("--output", default=str(ROOT / "bench" / "MIGRATE.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/migrate.py needs root (network and pid namespaces)")
    if args.lwk:
        lwk = Path(args.lwk).resolve()
    else:
        sh("cargo", "build", "--release", "-q", "-p", "lwk", cwd=ROOT)
        lwk = ROOT / "target" / "release" / "lwk"
    BUILD.mkdir(parents=True, exist_ok=True)
    memhog = BUILD / "memhog"
    sh("gcc", "-O2", "-o", str(memhog), str(ROOT / "bench" / "src" / "memhog.c"))
    sizes = [64] if args.quick else [64, 512]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lwk-bench-migrate-") as tmp:
        with Nodes(lwk, Path(tmp)) as nodes:
            for shaped in (False, True):
                nodes.shape(shaped)
                for mib in sizes:
                    r = nodes.migrate_once(memhog, mib, 15)
                    pre = sum(x["bytes"] for x in r["rounds"])
                    link_ms = (pre + r["image_bytes"]) * 8 / RATE_BITS * 1e3
                    rows.append((mib, "1 Gbit/s (tbf)" if shaped else "unshaped", r, link_ms))
                    print(f"{mib} MiB, {rows[-1][1]}: pre-copy {len(r['rounds'])} rounds, {pre / 2**20:.0f} MiB in "
                          f"{r['precopy_ms']:.0f} ms; frozen {r['freeze_ms']:.0f} ms "
                          f"(stop {r['stop_ms']:.1f}, capture {r['capture_ms']:.1f}, transfer {r['transfer_ms']:.0f} "
                          f"for {r['image_bytes'] / 2**20:.1f} MiB, restore {r['restore_ms']:.0f}), total "
                          f"{r['total_ms']:.0f} ms; bytes/1Gbit {link_ms:.0f} ms; check in B: {r['check']}",
                          flush=True)
                    if r["check"] != "ok":
                        sys.exit(f"memhog's memory was wrong after the migration: {r['check']}")
    if args.quick:
        return
    lines = [
        "# Migration benchmark",
        "",
        "Produced by `sudo python3 bench/migrate.py` (two network-namespace nodes on one machine, a veth link;",
        "`lwk migrate` of bench/src/memhog.c, which writes its memory once and then one word every 10 ms,",
        "and checks all of it at the end, in B). Times in ms from one run, from `lwk migrate --json`.",
        "",
        "Memory goes ahead while the program runs (**pre-copy**: a first round of everything, then rounds of",
        "what was written since, until it is under 1 MiB or stops shrinking); the freeze carries the rest and",
        "the state. `link` is all bytes sent / 1 Gbit/s, the issue's yardstick for the total on the shaped",
        "link (aim: total within 1.5x of it; freeze under 200 ms for 1 GiB).",
        "",
        "| memory | link | rounds | pre-copy MiB | pre-copy | frozen | stop threads | capture | transfer (MiB) | restore | total | link | total / link |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mib, link, r, link_ms in rows:
        pre = sum(x["bytes"] for x in r["rounds"]) / (1 << 20)
        lines.append(
            f"| {mib} MiB | {link} | {len(r['rounds'])} | {pre:.0f} | {r['precopy_ms']:.0f} | "
            f"{r['freeze_ms']:.0f} | {r['stop_ms']:.1f} | {r['capture_ms']:.1f} | "
            f"{r['transfer_ms']:.0f} ({r['image_bytes'] / (1 << 20):.1f}) | {r['restore_ms']:.0f} | "
            f"{r['total_ms']:.0f} | {link_ms:.0f} | {r['total_ms'] / link_ms:.2f} |")
    lines += ["", f"Run on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs.", ""]
    Path(args.output).write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
