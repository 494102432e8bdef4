#!/usr/bin/env python3
"""Migration benchmark: `lwk migrate` between two namespace nodes, and
`lwk checkpoint` / `lwk restore` of the same program.

    sudo python3 bench/migrate.py            # writes bench/MIGRATE.md
    sudo python3 bench/migrate.py --quick    # 64 MiB only, no file written

Builds lwk (cargo build --release) and bench/src/memhog.c, makes three
network namespaces on a bridge (node A, node B and a client C,
198.18.0.0/24; the service address 198.18.0.10 starts on A), starts a node
daemon in B, and runs memhog under `lwk run` in A, migrates it to B and
reads the report of `lwk migrate --json`: the pre-copy rounds, the freeze
(stop the threads, capture, transfer, restore) and the total. The matrix:
64 MiB, 512 MiB and 1 GiB idle, on an unshaped link and one shaped to
1 Gbit/s with tc tbf on A's side; 512 MiB with a writer dirtying 32 and
128 MiB/s; 64 MiB and 1 GiB with 100 and 1000 established TCP connections
from C, each of which must still echo afterwards. memhog checks its whole
memory at the end (in B) and must say "ok", which comes back through the
`lwk run` in A. Then memhog is checkpointed to disk and restored: the time
of each and the image's size.

What the issue measures this against: total time within 1.5x of the bytes
sent / link rate on the shaped link, and a freeze under 200 ms for 1 GiB
and 1000 connections.

Standard library only; needs root (namespaces), iproute2 and gcc. Removes
its namespaces on every exit path.
"""

import argparse
import json
import os
import resource
import signal
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


SERVICE = "198.18.0.10"
PORT = 7001

# The client: CONNS connections to the service, "connected" once all are
# up; then, for each line on stdin, one message on every connection and
# its echo back; prints how many echoed right and how many failed.
CLIENT = r"""
import socket, sys
n, addr, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
conns = [socket.create_connection((addr, port), timeout=30) for _ in range(n)]
print("connected", flush=True)
for line in sys.stdin:
    good = bad = 0
    for i, c in enumerate(conns):
        msg = ("%d %s" % (i, line.strip())).encode()
        try:
            c.sendall(msg)
            got = b""
            while len(got) < len(msg):
                part = c.recv(len(msg) - len(got))
                if not part:
                    break
                got += part
            good += got == msg
            bad += got != msg
        except OSError:
            bad += 1
    print("echo %d %d" % (good, bad), flush=True)
"""


class Nodes:
    def __init__(self, lwk, state):
        pid = os.getpid()
        self.ns = {n: f"lwk-bench-{n}-{pid}" for n in "abcs"}
        self.a, self.b, self.c = self.ns["a"], self.ns["b"], self.ns["c"]
        self.dev = {n: f"b{n}{pid}" for n in "abc"}
        self.lwk, self.state = lwk, state
        self.daemon = None

    def __enter__(self):
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
        sw = self.ns["s"]
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for n, addr in (("a", A_ADDR), ("b", B_ADDR), ("c", "198.18.0.100")):
            inner, outer = self.dev[n], f"p{n}{os.getpid()}"
            sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            sh("ip", "link", "set", inner, "netns", self.ns[n])
            sh("ip", "link", "set", outer, "netns", sw)
            sh("ip", "-n", sw, "link", "set", outer, "master", "br0", "up")
            sh("ip", "-n", self.ns[n], "addr", "add", f"{addr}/24", "dev", inner)
            sh("ip", "-n", self.ns[n], "link", "set", inner, "up")
            sh("ip", "-n", self.ns[n], "link", "set", "lo", "up")
        sh("ip", "-n", self.a, "addr", "add", f"{SERVICE}/24", "dev", self.dev["a"])
        self.key = self.state / "cluster.key"
        sh(str(self.lwk), "node", "keygen", str(self.key), stdout=subprocess.DEVNULL)
        self.log = open(self.state / "daemon.log", "w")
        self.daemon = subprocess.Popen(
            ["ip", "netns", "exec", self.b, str(self.lwk), "node", "serve", "--listen", f"{B_ADDR}:7070",
             "--key", str(self.key), "--state-dir", str(self.state / "node"), "--service-dev", self.dev["b"]],
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
        for ns in self.ns.values():
            sh("ip", "netns", "delete", ns, check=False)

    def shape(self, on):
        if on:
            sh("tc", "-n", self.a, "qdisc", "replace", "dev", self.dev["a"], "root", "tbf", "rate", "1gbit",
               "burst", "1mb", "latency", "50ms")
        else:
            sh("tc", "-n", self.a, "qdisc", "del", "dev", self.dev["a"], "root", check=False,
               stderr=subprocess.DEVNULL)

    def service_back_to_a(self):
        """After a migration with connections the service address is in B."""
        sh("ip", "-n", self.b, "addr", "del", f"{SERVICE}/24", "dev", self.dev["b"], check=False,
           stderr=subprocess.DEVNULL)
        sh("ip", "-n", self.a, "addr", "replace", f"{SERVICE}/24", "dev", self.dev["a"])
        # B announced the address when it took it: the client forgets that.
        sh("ip", "-n", self.c, "neigh", "flush", "dev", self.dev["c"])

    def start_memhog(self, memhog, mib, seconds, rate, conns):
        args = [str(memhog), str(mib), str(seconds), str(rate)]
        if conns:
            args += [SERVICE, str(PORT), str(conns)]
        app = subprocess.Popen(["ip", "netns", "exec", self.a, str(self.lwk), "run", "--", *args],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, close_fds=True)
        if app.stdout.readline() != b"ready\n":
            raise RuntimeError("memhog did not start")
        client = None
        if conns:
            client = subprocess.Popen(["ip", "netns", "exec", self.c, sys.executable, "-c", CLIENT, str(conns),
                                       SERVICE, str(PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True)
            if client.stdout.readline() != "connected\n" or app.stdout.readline() != b"connected\n":
                raise RuntimeError("the client did not connect")
        apps = json.loads(sh(str(self.lwk), "ps", "--json", capture_output=True).stdout)
        pid = next(a["pid"] for a in apps if a["command"].startswith(str(memhog)))
        return app, client, pid

    def echo(self, client, what):
        client.stdin.write(what + "\n")
        client.stdin.flush()
        good, bad = map(int, client.stdout.readline().split()[1:])
        return good, bad

    def migrate_once(self, memhog, mib, rate=0, conns=0):
        # Long enough to be migrated while it runs, on the shaped link too;
        # it is told to end (SIGUSR1, through the relay) once moved.
        seconds = 120
        app, client, pid = self.start_memhog(memhog, mib, seconds, rate, conns)
        try:
            if client and self.echo(client, "before") != (conns, 0):
                raise RuntimeError("the connections did not echo before the migration")
            time.sleep(0.5)  # the writer runs
            extra = ["--address", f"{SERVICE}/24"] if conns else []
            r = sh("ip", "netns", "exec", self.a, str(self.lwk), "migrate", str(pid), "--to", B_ADDR,
                   "--key", str(self.key), "--json", *extra, capture_output=True, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"lwk migrate failed: {r.stderr.decode()}")
            report = json.loads(r.stdout)
            if client:
                report["echo_after"] = self.echo(client, "after")
                client.stdin.close()
                client.wait()
            # memhog checks its memory in B; `lwk run` in A passes the
            # signal on, and relays its word.
            app.send_signal(signal.SIGUSR1)
            report["check"] = app.stdout.readline().decode().strip()
            app.wait(timeout=seconds + 120)
            return report
        finally:
            for p in (app, client):
                if p and p.poll() is None:
                    p.kill()
                    p.wait()
            if conns:
                self.service_back_to_a()

    def checkpoint_restore(self, memhog, mib, tmp):
        """`lwk checkpoint` of memhog, then `lwk restore` until it is ready
        to run (parked at its gate): times and the image's size."""
        app, _, pid = self.start_memhog(memhog, mib, 4, 0, 0)
        image = Path(tmp) / f"image-{mib}"
        try:
            t = time.monotonic()
            sh(str(self.lwk), "checkpoint", str(pid), str(image), "--json", capture_output=True)
            checkpoint_ms = (time.monotonic() - t) * 1e3
            app.wait()
        finally:
            if app.poll() is None:
                app.kill()
                app.wait()
        size = sum(f.stat().st_size for f in image.iterdir())
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        t = time.monotonic()
        restored = subprocess.Popen([str(self.lwk), "restore", str(image), "--ready-fd", str(ready_w),
                                     "--go-fd", str(go_r)], pass_fds=(ready_w, go_r), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE)
        os.close(ready_w)
        os.close(go_r)
        if os.read(ready_r, 1) != b"r" and restored.poll() is not None:
            raise RuntimeError("lwk restore failed")
        restore_ms = (time.monotonic() - t) * 1e3
        os.write(go_w, b"g")
        check = restored.stdout.read().decode().strip()
        restored.wait()
        os.close(ready_r)
        os.close(go_w)
        return {"mib": mib, "checkpoint_ms": checkpoint_ms, "restore_ms": restore_ms, "image_bytes": size,
                "check": check}


def row_text(mib, link, rate, conns, r):
    pre = sum(x["bytes"] for x in r["rounds"])
    link_ms = (pre + r["image_bytes"]) * 8 / RATE_BITS * 1e3
    echo = f"{r['echo_after'][0]}/{conns}" if conns else "-"
    return link_ms, (
        f"| {mib} MiB | {link} | {rate or 'idle'} | {conns} | {len(r['rounds'])} | {pre / 2**20:.0f} | "
        f"{r['precopy_ms']:.0f} | **{r['freeze_ms']:.0f}** | {r['stop_ms']:.1f} | {r['capture_ms']:.1f} | "
        f"{r['transfer_ms']:.0f} ({r['image_bytes'] / 2**20:.1f}) | {r['in_flight_ms']:.0f} | {r['restore_ms']:.0f} | "
        f"{r['commit_ms']:.0f} | {r['resume_ms']:.0f} | "
        f"{r['resent_bytes'] / 2**20:.0f} | {r['total_ms']:.0f} | {link_ms:.0f} | {r['total_ms'] / link_ms:.2f} | {echo} |")


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
    # 1000 connections, each a descriptor in the application and its proxy.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    if args.quick:
        runs = [(64, False, 0, 0), (64, True, 32, 100)]
        images = [64]
    else:
        runs = [(m, shaped, 0, 0) for shaped in (False, True) for m in (64, 512, 1024)]
        runs += [(512, True, rate, 0) for rate in (8, 32, 128)]
        runs += [(64, True, 0, 100), (64, True, 0, 1000), (1024, True, 0, 1000)]
        images = [64, 512, 1024]
    rows, images_done = [], []
    with tempfile.TemporaryDirectory(prefix="lwk-bench-migrate-") as tmp:
        with Nodes(lwk, Path(tmp)) as nodes:
            for mib, shaped, rate, conns in runs:
                nodes.shape(shaped)
                link = "1 Gbit/s (tbf)" if shaped else "unshaped"
                r = nodes.migrate_once(memhog, mib, rate, conns)
                link_ms, row = row_text(mib, link, rate, conns, r)
                rows.append(row)
                print(row, f"check in B: {r['check']}", flush=True)
                if r["check"] != "ok":
                    sys.exit(f"memhog's memory was wrong after the migration: {r['check']}")
                if conns and r["echo_after"] != (conns, 0):
                    sys.exit(f"connections lost in the migration: {r['echo_after']}")
            nodes.shape(False)
            for mib in images:
                c = nodes.checkpoint_restore(memhog, mib, tmp)
                print(c, flush=True)
                if c["check"] != "ok":
                    sys.exit(f"memhog's memory was wrong after the restore: {c['check']}")
                images_done.append(c)
    if args.quick:
        return
    lines = [
        "# Migration benchmark",
        "",
        "Produced by `sudo python3 bench/migrate.py` (three network-namespace nodes on one machine on a",
        "bridge: A, B and a client C; `lwk migrate` of bench/src/memhog.c from A to B, which writes its memory",
        "once, then rewrites `rate` MiB/s of it (idle: one word every 10 ms) and echoes on its connections,",
        "and checks all of its memory at the end, in B). Times in ms from one run, from `lwk migrate --json`.",
        "",
        "Memory goes ahead while the program runs (**pre-copy**: a first round of everything, then rounds of",
        "what was written since, until a round's would take under 50 ms to send, or stops shrinking, or 8",
        "rounds: `--target-freeze`); the freeze carries the rest,",
        "the state and the sockets. `link` is all bytes sent / 1 Gbit/s, the issue's yardstick for the total",
        "on the shaped link (aim: total within 1.5x of it; freeze under 200 ms for 1 GiB and 1000",
        "connections). `frozen` is stop threads + capture + transfer (written here) + in flight (still on",
        "its way: socket buffers, the link) + restore + commit (the address moves, the go and the",
        "destination's word that it runs: a round trip) + resume (the destination's sockets leave repair",
        "mode, the address comes up there, the gate opens). `resent` is memory sent more than",
        "once (what the later rounds and the freeze carried). `echo` counts the client's connections that",
        "echoed right after the migration.",
        "",
        "| memory | link | rate MiB/s | connections | rounds | pre-copy MiB | pre-copy | frozen | stop threads | "
        "capture | transfer (MiB) | in flight | restore | commit | resume | resent MiB | total | link | total / link | "
        "echo |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Checkpoint to disk and restore",
        "",
        "`lwk checkpoint` of memhog (idle) to a directory, then `lwk restore` of it until the application is",
        "restored and parked at its gate, ready to run (then it runs, and its check must say ok).",
        "",
        "| memory | checkpoint ms | restore ms | image MiB |",
        "|---|---|---|---|",
        *[f"| {c['mib']} MiB | {c['checkpoint_ms']:.0f} | {c['restore_ms']:.0f} | {c['image_bytes'] / 2**20:.1f} |"
          for c in images_done],
        "",
        f"Run on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs.",
        "",
    ]
    Path(args.output).write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
