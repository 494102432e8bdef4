#!/usr/bin/env python3
"""CPython's own regression tests, natively and under `lwk run`.

Runs each module with `/usr/bin/python3.11 -m test -v MODULE` (Debian's
libpython3.11-testsuite), natively and under lwk, counts per test case
ok / failed / skipped, lists every case that passes natively but not under
lwk, and writes bench/COMPAT.md (or --output). Standard library only.

    python3 bench/compat.py                 # the modules the issue names
    python3 bench/compat.py test_os test_io # just these
    python3 bench/compat.py --quick         # the fast regression guard set
"""
import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    "test_os", "test_posix", "test_signal", "test_threading", "test_thread", "test_subprocess", "test_socket",
    "test_select", "test_selectors", "test_mmap", "test_fcntl", "test_time", "test_tempfile", "test_shutil",
    "test_io", "test_fileio", "test_file", "test_pipes", "test_epoll", "test_resource", "test_concurrent_futures",
    "test_asyncio",
]
# Cases left out natively and under lwk alike, with the reason.
IGNORE = {
    # The VM's vsock: the server's accept waits forever, natively too.
    "test_socket": ["*VSOCK*"],
}
QUICK = ["test_fcntl", "test_select", "test_file", "test_tempfile", "test_pipes", "test_epoll", "test_resource"]
CASE = re.compile(r"^(test\S*) \((\S+)\)\S* \.\.\. (.*)$")


def classify(result):
    # Some modules print the case's duration first: "0.07s ok".
    result = re.sub(r"^\d+(\.\d+)?s ", "", result)
    if result.startswith("ok"):
        return "ok"
    if result.startswith("skipped"):
        return "skipped"
    if result.startswith("expected failure"):
        return "ok"
    if result.startswith(("FAIL", "ERROR", "unexpected success")):
        return "failed"
    return None


def run(cmd, timeout):
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                           timeout=timeout, stdin=subprocess.DEVNULL)
        out, code = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        code = "timeout"
    cases = {}
    for line in out.splitlines():
        m = CASE.match(line.strip())
        if m:
            c = classify(m.group(3))
            if c:
                cases[m.group(2)] = c  # module.Class.test
    return cases, code, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--lwk", default=str(ROOT / "target/release/lwk"))
    ap.add_argument("--output", default=str(ROOT / "bench/COMPAT.md"))
    args = ap.parse_args()
    modules = args.modules or (QUICK if args.quick else MODULES)
    py = "/usr/bin/python3.11"
    if not Path(py).exists() or not Path("/usr/lib/python3.11/test/__main__.py").exists():
        sys.exit("needs Debian's python3.11 and libpython3.11-testsuite")
    rows, diffs, failed_guard = [], [], False
    for mod in modules:
        cmd = [py, "-m", "test", "-v", mod] + [a for pat in IGNORE.get(mod, []) for a in ("-i", pat)]
        native, ncode, nt = run(cmd, args.timeout)
        lwk, lcode, lt = run([args.lwk, "run", "--"] + cmd, args.timeout)
        count = lambda d, k: sum(1 for v in d.values() if v == k)
        lost = sorted(c for c, v in native.items() if v == "ok" and lwk.get(c) != "ok")
        rows.append((mod, [count(native, k) for k in ("ok", "failed", "skipped")], ncode, nt,
                     [count(lwk, k) for k in ("ok", "failed", "skipped")], lcode, lt, len(lost)))
        diffs += [(mod, c, lwk.get(c, "not run")) for c in lost]
        failed_guard |= bool(lost)
        print(f"{mod}: native ok/failed/skipped {rows[-1][1]} ({nt:.1f} s), lwk {rows[-1][4]} ({lt:.1f} s, "
              f"exit {lcode}), {len(lost)} passing natively but not under lwk", flush=True)
    lines = [
        "# CPython regression tests under lwk",
        "",
        f"Produced by `python3 bench/compat.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` on "
        f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, `{py} -m test -v MODULE` natively and under "
        "`lwk run`; counts are test cases (an expected failure counts as ok).",
        "",
    ]
    ignored = [f"{m} `{p}`" for m in modules for p in IGNORE.get(m, [])]
    if ignored:
        lines += ["Left out of both runs (`-i`): " + ", ".join(ignored) + ": in this VM the vsock server's accept "
                  "waits forever, natively too.", ""]
    lines += [
        "| module | native ok / failed / skipped | lwk ok / failed / skipped | passing natively, not under lwk | native s | lwk s | lwk exit |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for mod, n, ncode, nt, l, lcode, lt, lost in rows:
        lines.append(f"| {mod} | {n[0]} / {n[1]} / {n[2]} | {l[0]} / {l[1]} / {l[2]} | {lost} | {nt:.1f} | {lt:.1f} | {lcode} |")
    lines += ["", "## Cases that pass natively but not under lwk", ""]
    lines += [f"* {m}: `{c}`: {r}" for m, c, r in diffs] or ["None."]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    # Cases passing under lwk, and natively passing cases lost under lwk.
    print(f"compat totals: {sum(r[4][0] for r in rows)} passed, {len(diffs)} failed")
    return 1 if failed_guard else 0


if __name__ == "__main__":
    sys.exit(main())
