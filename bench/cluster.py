#!/usr/bin/env python3
"""Single-IP cluster benchmark: `lwk migrate --cluster` of a busy service,
against the previous issue's way (the address moved at the freeze, the
peers' packets dropped meanwhile), in one run.

    sudo python3 bench/cluster.py           # writes bench/CLUSTER.md and bench/cluster.svg
    sudo python3 bench/cluster.py --quick   # 64 MiB, 100 connections, 10 flows; no file written

Builds lwk (cargo build --release) and bench/src/cluster_service.c. For each
case it makes the simulated cluster (`lwk cluster sim up 2`, a client side
and two nodes on a flooding front bridge, a daemon per node; optionally
both networks shaped to 1 Gbit/s with tc), starts cluster_service under
`lwk run` on node 1 with MiB of memory (a writer rewriting RATE MiB/s of
it), and a client (Python, in the client namespace) with CONNS established
TCP connections and FLOWS UDP flows: each connection sends a numbered line
every second and waits for its echo, each flow a numbered datagram every
100 ms. After a few seconds the service is migrated to node 2, then back;
the client goes on throughout and counts what it saw: request latencies
(before, during and after the migrations), the longest stall, TCP
retransmissions and resets (/proc/net/snmp of the client namespace) and
datagrams whose echo never came (or came twice). The service checks all of
its memory at the end and must say "ok".

The cases: `lwk migrate --cluster` on the shaped and on the unshaped
network, and the baseline on the shaped network: the same sim without its
cluster configuration (`lwk cluster down` on each node), the address on
node 1 only, and `lwk migrate --address` (issue 9: the address moves at the
freeze; until then the peers' TCP is dropped, and what comes in between is
lost or sent again).

Standard library only; needs root (namespaces), iproute2, nftables,
iptables and gcc. `lwk cluster sim down` on every exit path.
"""

import argparse
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "bench" / "build"
SERVICE = "198.18.0.10"
TCP_PORT, UDP_PORT = 7001, 7002
KEY = "/run/lwk/sim/cluster.key"

# The client: connects, then sends until a line comes on stdin; prints one
# JSON object: per request (connection, sent at, latency), per flow the
# numbers echoed, and the snmp counters' changes.
CLIENT = r"""
import heapq, json, selectors, socket, sys, time
conns_n, flows_n, addr, tport, uport = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def snmp():
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))
conns = [socket.create_connection((addr, tport), timeout=30) for _ in range(conns_n)]
flows = []
for _ in range(flows_n):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("198.18.0.100", 0)); u.setblocking(False); flows.append(u)
sel = selectors.DefaultSelector()
for i, c in enumerate(conns):
    c.setblocking(False); sel.register(c, selectors.EVENT_READ, ("t", i))
for f, u in enumerate(flows):
    sel.register(u, selectors.EVENT_READ, ("u", f))
sel.register(sys.stdin, selectors.EVENT_READ, ("stop", 0))
print("connected", flush=True)
before = snmp()
TCP_EVERY, UDP_EVERY = 1.0, 0.1
start = time.time()
# What is due next, soonest first: ("t", connection) or ("u", flow).
due = [(start + TCP_EVERY * i / max(conns_n, 1), "t", i) for i in range(conns_n)]
due += [(start + UDP_EVERY * f / max(flows_n, 1), "u", f) for f in range(flows_n)]
heapq.heapify(due)
seq = [0] * conns_n; sent_at = [None] * conns_n; buf = [b""] * conns_n
useq = [0] * flows_n
echoed = [[] for _ in range(flows_n)]; usent = [[] for _ in range(flows_n)]
requests = []; broken = []; dead = set()
stopping = None
while True:
    now = time.time()
    if stopping and now > stopping:
        break
    while due and due[0][0] <= now and not stopping:
        _, kind, i = heapq.heappop(due)
        if kind == "u":
            flows[i].sendto(b"%d" % useq[i], (addr, uport)); usent[i].append((useq[i], now))
            useq[i] += 1
            heapq.heappush(due, (now + UDP_EVERY, "u", i))
        elif i not in dead:
            try:
                conns[i].send(b"%d %d\n" % (i, seq[i])); sent_at[i] = now
            except OSError as e:
                broken.append("%d: send at %.3f: %s" % (i, now, e)); dead.add(i); sel.unregister(conns[i])
    timeout = max(0.0, min(due[0][0] - time.time(), 0.01)) if due and not stopping else 0.01
    for key, _ in sel.select(timeout=timeout):
        kind, i = key.data
        if kind == "stop":
            sys.stdin.readline(); sel.unregister(sys.stdin); stopping = time.time() + 1.0
        elif kind == "u":
            try:
                while True:
                    echoed[i].append(int(flows[i].recv(64)))
            except BlockingIOError:
                pass
        else:
            try:
                data = conns[i].recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                broken.append("%d: recv at %.3f: %s" % (i, time.time(), e)); dead.add(i); sel.unregister(conns[i]); continue
            if not data:
                broken.append("%d: closed at %.3f" % (i, time.time())); dead.add(i); sel.unregister(conns[i]); continue
            buf[i] += data
            want = b"%d %d\n" % (i, seq[i])
            if len(buf[i]) >= len(want):
                t = time.time()
                if buf[i][:len(want)] != want:
                    broken.append("%d: got %r for %r" % (i, buf[i], want))
                requests.append((sent_at[i], t - sent_at[i]))
                buf[i] = buf[i][len(want):]; seq[i] += 1; sent_at[i] = None
                heapq.heappush(due, (t + TCP_EVERY, "t", i))
after = snmp()
got = [set(e) for e in echoed]
lost_at = [t for f in range(flows_n) for n, t in usent[f] if n not in got[f]]
missing = len(lost_at)
twice = sum(len(e) - len(g) for e, g in zip(echoed, got))
# The service ends when a connection sends "end".
alive = [c for i, c in enumerate(conns) if i not in dead]
if alive:
    alive[-1].setblocking(True); alive[-1].sendall(b"end\n"); alive[-1].recv(16)
print(json.dumps({"requests": requests, "udp_sent": sum(map(len, usent)), "udp_missing": missing, "udp_twice": twice,
                  "udp_lost_at": lost_at, "retransmitted": after["RetransSegs"] - before["RetransSegs"],
                  "resets": after["EstabResets"] - before["EstabResets"], "broken": broken}), flush=True)
"""


def sh(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, **kw)


def build():
    sh("cargo", "build", "--release", "--quiet", cwd=ROOT)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    BUILD.mkdir(exist_ok=True)
    service = BUILD / "cluster_service"
    sh("gcc", "-O2", "-o", service, ROOT / "bench" / "src" / "cluster_service.c")
    return target / "release" / "lwk", service


class Sim:
    """`lwk cluster sim up 2`, down again on every exit path."""

    def __init__(self, lwk, shaped, cluster):
        self.lwk, self.shaped, self.cluster = lwk, shaped, cluster

    def __enter__(self):
        sh(self.lwk, "cluster", "sim", "down", capture_output=True)
        shape = ["--shape-front", "1gbit", "--shape-cluster", "1gbit"] if self.shaped else []
        self.info = json.loads(sh(self.lwk, "cluster", "sim", "up", "2", *shape, "--json",
                                  capture_output=True).stdout)
        self.nodes = [n["netns"] for n in self.info["nodes"]]
        self.client = self.info["client"]["netns"]
        if not self.cluster:
            # The previous issue's setting: no cluster filter, the address
            # on node 1 only; it moves with the application.
            for ns in self.nodes:
                sh("ip", "netns", "exec", ns, self.lwk, "cluster", "down", capture_output=True)
                sh("ip", "-n", ns, "link", "set", "front", "up")
            # Each node's own address on the front (the route to the
            # clients while the service address is elsewhere).
            for k, ns in enumerate(self.nodes):
                sh("ip", "-n", ns, "addr", "add", f"198.18.0.{21 + k}/24", "dev", "front")
            sh("ip", "-n", self.nodes[0], "addr", "add", f"{SERVICE}/24", "dev", "front")
        return self

    def __exit__(self, *exc):
        sh(self.lwk, "cluster", "sim", "down", capture_output=True, check=False)

    def migrate(self, pid, src, dst):
        extra = ["--cluster"] if self.cluster else []
        r = sh("ip", "netns", "exec", self.nodes[src], self.lwk, "migrate", pid, "--to", f"198.18.1.{dst + 1}:7070",
               "--key", KEY, "--address", f"{SERVICE}/24", *extra, "--json", capture_output=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"lwk migrate: {r.stderr.decode()}")
        return json.loads(r.stdout)


def snmp(ns):
    """A node's counters: TCP segments sent again, datagrams dropped for a
    full receive buffer."""
    text = sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp", capture_output=True, text=True).stdout
    table = {}
    for names, values in zip(*[iter([l.split() for l in text.splitlines()])] * 2):
        table.update({f"{names[0]}{n}": int(v) for n, v in zip(names[1:], values[1:])})
    return {"retransmitted": table["Tcp:RetransSegs"], "udp_buffer_full": table["Udp:RcvbufErrors"]}


def pid_of(lwk, ns, service):
    apps = json.loads(sh("ip", "netns", "exec", ns, lwk, "ps", "--json", capture_output=True).stdout)
    return next(a["pid"] for a in apps if a["command"].startswith(str(service)))


def percentiles(values):
    if not values:
        return {"n": 0}
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(q * len(v)))] * 1e3
    return {"n": len(v), "p50": at(0.5), "p99": at(0.99), "max": v[-1] * 1e3}


def one_case(lwk, service, shaped, cluster, mib, rate, conns, flows):
    with Sim(lwk, shaped, cluster) as sim:
        app = subprocess.Popen(["ip", "netns", "exec", sim.nodes[0], str(lwk), "run", "--", str(service), SERVICE,
                                str(TCP_PORT), str(UDP_PORT), str(mib), str(rate)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, close_fds=True)
        client = None
        try:
            if app.stdout.readline() != "ready\n":
                raise RuntimeError("cluster_service did not start")
            client = subprocess.Popen(["ip", "netns", "exec", sim.client, sys.executable, "-c", CLIENT, str(conns),
                                       str(flows), SERVICE, str(TCP_PORT), str(UDP_PORT)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if client.stdout.readline() != "connected\n":
                raise RuntimeError("the client did not connect")
            pid = pid_of(lwk, sim.nodes[0], service)
            time.sleep(4)
            windows, reports = [], []
            for src, dst in ((0, 1), (1, 0)):
                t0 = time.time()
                report = sim.migrate(pid if src == 0 else pid_of(lwk, sim.nodes[1], service), src, dst)
                windows.append((t0, time.time()))
                reports.append(report)
                time.sleep(4)
            client.stdin.write("stop\n")
            client.stdin.flush()
            seen = json.loads(client.stdout.readline())
            client.wait(timeout=60)
            # Its last words: the memory check (it ends on the client's
            # "end"; one that does not is reported, not waited for).
            ready, _, _ = select.select([app.stdout], [], [], 60)
            check = app.stdout.readline().strip() if ready else "no answer"
            if ready:
                app.wait(timeout=120)
            nodes = [snmp(ns) for ns in sim.nodes]
        finally:
            for p in (app, client):
                if p and p.poll() is None:
                    p.kill()
                    p.wait()
    during = lambda t: any(a - 0.05 <= t <= b + 0.5 for a, b in windows)
    reqs = seen["requests"]
    return {
        "network": "1 Gbit/s (tbf)" if shaped else "unshaped",
        "way": "lwk migrate --cluster" if cluster else "baseline: address moved, packets dropped",
        "memory_mib": mib, "rate": rate, "connections": conns, "flows": flows,
        "reports": reports, "windows": windows, "check": check,
        "latency_before": percentiles([l for t, l in reqs if t < windows[0][0]]),
        "latency_during": percentiles([l for t, l in reqs if during(t)]),
        "latency_after": percentiles([l for t, l in reqs if t > windows[-1][1] + 0.5]),
        "longest_stall_ms": max((l for _, l in reqs), default=0) * 1e3,
        "nodes_retransmitted": sum(n["retransmitted"] for n in nodes),
        "nodes_udp_buffer_full": sum(n["udp_buffer_full"] for n in nodes),
        "nodes": nodes,
        "requests": reqs,
        **{k: seen[k] for k in ("udp_sent", "udp_missing", "udp_twice", "udp_lost_at", "retransmitted", "resets",
                                "broken")},
    }


def row(c, i):
    r = c["reports"][i]
    rounds = " + ".join(f"{x['bytes'] / 2**20:.0f}" for x in r["rounds"])
    parts = (f"{r['stop_ms']:.0f} / {r['capture_ms']:.0f} ({r.get('hold_ms', 0):.0f}) / {r['transfer_ms']:.0f} / "
             f"{r['in_flight_ms']:.0f} / {r['restore_ms']:.0f} / {r['commit_ms']:.0f} / {r['resume_ms']:.0f}")
    return [c["way"], c["network"], ("there", "back")[i], f"**{r['freeze_ms']:.0f}**", parts,
            f"{r['total_ms'] / 1e3:.1f}", rounds]


def client_row(c):
    fmt = lambda p: f"{p['p50']:.1f} / {p['p99']:.1f} / {p['max']:.0f}" if p["n"] else "-"
    return [c["way"], c["network"], str(c["retransmitted"]), str(c["nodes_retransmitted"]), str(c["resets"]),
            f"{c['udp_missing']} of {c['udp_sent']}", str(c["nodes_udp_buffer_full"]), str(c["udp_twice"]),
            f"{c['longest_stall_ms']:.0f}",
            fmt(c["latency_before"]), fmt(c["latency_during"]), fmt(c["latency_after"]),
            c["check"] + (f" ({len(c['broken'])} broken)" if c["broken"] else "")]


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def chart(c, path):
    """One migration (the first of case `c`): the pre-copy rounds (MiB sent,
    and of it written since the round before) and the freeze, above the
    client's request latency, on one time axis (seconds from the start of
    `lwk migrate`). Hand-written SVG: the benchmarks use only Python's
    standard library."""
    (t0, t1), r = c["windows"][0], c["reports"][0]
    lo, hi = -1.0, (t1 - t0) + 1.5
    W, H, L, R = 900, 520, 70, 20
    x = lambda t: L + (t - lo) / (hi - lo) * (W - L - R)
    top = (40, 220)
    bot = (280, 470)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="20" font-size="14">lwk migrate --cluster, {c["memory_mib"]} MiB, '
           f'{c["connections"]} TCP + {c["flows"]} UDP, {c["network"]}: one migration</text>']
    # The freeze follows the pre-copy (the report's times are from the
    # start of lwk migrate, within a few ms of t0).
    fz_start = r["precopy_ms"] / 1e3
    fz_end = fz_start + r["freeze_ms"] / 1e3
    for y0, y1 in (top, bot):
        out.append(f'<rect x="{x(fz_start):.1f}" y="{y0}" width="{max(x(fz_end) - x(fz_start), 1.5):.1f}" '
                   f'height="{y1 - y0}" fill="#f4a6a6"/>')
    out.append(f'<text x="{x(fz_end) + 4:.1f}" y="{top[0] + 14}" fill="#b00">freeze {r["freeze_ms"]:.0f} ms</text>')
    # Rounds: bars as long as each round, as high as its MiB.
    peak = max([x_["bytes"] for x_ in r["rounds"]] + [1]) / 2**20
    ty = lambda mib: top[1] - mib / peak * (top[1] - top[0] - 20)
    t = 0.0
    for i, rd in enumerate(r["rounds"]):
        a, b = t, t + rd["ms"] / 1e3
        mib, dirty = rd["bytes"] / 2**20, rd["dirty_bytes"] / 2**20
        out.append(f'<rect x="{x(a):.1f}" y="{ty(mib):.1f}" width="{max(x(b) - x(a), 1.5):.1f}" '
                   f'height="{top[1] - ty(mib):.1f}" fill="#8fb3e0"/>')
        out.append(f'<rect x="{x(a):.1f}" y="{ty(dirty):.1f}" width="{max(x(b) - x(a), 1.5):.1f}" '
                   f'height="{top[1] - ty(dirty):.1f}" fill="#2a5caa"/>')
        if x(b) - x(a) > 90:
            out.append(f'<text x="{x(a) + 2:.1f}" y="{ty(mib) - 4:.1f}">round {i + 1}: {mib:.0f} MiB</text>')
        t = b
    sizes = " + ".join(f"{rd['bytes'] / 2**20:.0f}" for rd in r["rounds"])

    out.append(f'<text x="10" y="{top[0] + 10}">MiB sent</text>')
    out.append(f'<text x="{L}" y="{top[1] + 16}" fill="#2a5caa">pre-copy rounds of {sizes} MiB; dark: written '
               'since the round before (dirty); light: all sent in the round</text>')
    # Latency, log scale from 0.1 ms to the longest.
    import math
    lat = [(s - t0, l * 1e3) for s, l in c["requests"] if lo <= s - t0 <= hi]
    top_ms = max([l for _, l in lat] + [10])
    ly = lambda ms: bot[1] - (math.log10(max(ms, 0.1)) + 1) / (math.log10(top_ms) + 1) * (bot[1] - bot[0])
    # Per 50 ms of send time: the range of latencies (a line from the
    # shortest to the longest) and the median (a dot).
    bins = {}
    for s, l in lat:
        bins.setdefault(int(s / 0.05), []).append(l)
    for b, ls in sorted(bins.items()):
        ls.sort()
        bx = x((b + 0.5) * 0.05)
        out.append(f'<line x1="{bx:.1f}" x2="{bx:.1f}" y1="{ly(ls[0]):.1f}" y2="{ly(ls[-1]):.1f}" stroke="#999"/>')
        out.append(f'<circle cx="{bx:.1f}" cy="{ly(ls[len(ls) // 2]):.1f}" r="1.6" fill="#222"/>')
    for ms in (0.1, 1, 10, 100, 1000):
        if ms <= top_ms:
            out.append(f'<line x1="{L}" x2="{W - R}" y1="{ly(ms):.1f}" y2="{ly(ms):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{L - 6}" y="{ly(ms) + 4:.1f}" text-anchor="end">{ms:g} ms</text>')
    out.append(f'<text x="10" y="{bot[0] - 8}">client request latency (TCP echo) by when it was sent, per 50 ms: '
               'range (line) and median (dot)</text>')
    for s in range(math.ceil(lo), math.floor(hi) + 1):
        out.append(f'<text x="{x(s):.1f}" y="{H - 30}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">seconds from the start of lwk migrate</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB, 100 connections, 10 flows; no file written")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/cluster.py needs root (network namespaces, packet filters)")
    mib, conns, flows, rate = (64, 100, 10, 4) if args.quick else (1024, 1000, 100, 8)
    lwk, service = build()
    cases = [(True, True), (False, True), (True, False)]
    results = []
    for shaped, cluster in cases:
        print(f"case: {'shaped' if shaped else 'unshaped'}, {'cluster' if cluster else 'baseline'}", flush=True)
        results.append(one_case(lwk, service, shaped, cluster, mib, rate, conns, flows))
    freeze = table(["way", "network", "migration", "frozen ms", "stop / capture (of it: hold) / transfer / in flight / "
                    "restore / commit / resume ms", "total s", "rounds (MiB)"],
                   [row(c, i) for c in results for i in (0, 1)])
    clients = table(["way", "network", "TCP sent again by clients", "by nodes", "resets", "datagrams lost",
                     "of them a full buffer at a node", "twice", "longest stall ms",
                     "latency before p50 / p99 / max ms", "during", "after", "memory check"],
                    [client_row(c) for c in results])
    cmd = "sudo python3 bench/cluster.py" + (" --quick" if args.quick else "")
    text = f"""# Single-IP cluster benchmark

Produced by `{cmd}` on {time.strftime('%Y-%m-%d')} (one run; the simulated cluster of `lwk cluster
sim up 2` on one machine: a client side and two nodes on a front bridge that floods every frame, a
cluster network between the daemons). A service under `lwk run` with {mib} MiB of memory (a writer
rewriting {rate} MiB/s of it), {conns} established TCP connections (each a line every second, echoed)
and {flows} UDP flows (each a numbered datagram every 100 ms, echoed) is migrated from node 1 to node 2
and back while the client goes on. `lwk migrate --cluster`: the address stays on every node; the
destination holds the flows' packets from the freeze until the sockets are live there. Baseline: the
same without the cluster (issue 9's way): the address moves at the freeze and the peers' packets
are dropped until then.

## The freeze

{freeze}

## What the clients saw (both migrations)

Latency of a TCP request (send to echo) by when it was sent: before the first migration, during
either (from its start to half a second after its end), after the second.

{clients}

The chart (bench/cluster.svg) shows the first migration of the shaped `--cluster` case. What the
figures say, and what would lower the freeze: bench/RESULTS.md.
"""
    if args.quick:
        print(text)
        return
    (ROOT / "bench" / "CLUSTER.md").write_text(text)
    chart(results[0], ROOT / "bench" / "cluster.svg")
    (BUILD / "cluster.json").write_text(json.dumps(results))
    print(text)


if __name__ == "__main__":
    main()
