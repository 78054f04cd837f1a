#!/usr/bin/env python3
"""Benchmark dpmock against a bare tuned ThreadingHTTPServer and (optionally) the Flask mock.

Usage:
    python3 bench_dpmock.py [--flask PATH/TO/main.py] [--duration S]

Measures, in one run: start-up to first answer, keep-alive small-JSON requests/s (wrk when
installed, else a stdlib load generator), a 101 MiB LARGE_FILE_UPLOAD through curl (curl's
time_total and the server's RSS growth), and idle RSS. Exits 1 if a target is missed.
Every server runs under the interpreter that runs this script, so the comparison is fair:
to include the Flask mock, run it with a python that has flask installed. Servers run with
Python's default bytecode caching (PYTHONDONTWRITEBYTECODE removed from their environment),
as pip already gave Flask's modules, and after one uncounted warm-up start.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
SMALL_JSON = b'{"object": "list", "data": []}'
KEY = "EMPTY_LIST"


# ----------------------------------------------------------------------------- the baseline

class _Bare(BaseHTTPRequestHandler):
    """The tuned stdlib baseline: HTTP/1.1, buffered writes flushed once, TCP_NODELAY, no log."""

    protocol_version = "HTTP/1.1"
    wbufsize = -1
    disable_nagle_algorithm = True

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(SMALL_JSON)))
        self.end_headers()
        self.wfile.write(SMALL_JSON)

    def log_message(self, *args):
        pass


def run_baseline(port):
    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128
    srv = Server(("127.0.0.1", port), _Bare)
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    srv.serve_forever()


# ----------------------------------------------------------------------------- processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    """One server under test, started as a child process."""

    def __init__(self, name, cmd, path, headers, cwd=None):
        self.name, self.cmd, self.path, self.headers, self.cwd = name, cmd, path, headers, cwd
        self.proc = None
        self.port = None

    def start(self):
        """Start it; return seconds from spawn to the first 200 answer."""
        self.port = free_port()
        cmd = [c.replace("{port}", str(self.port)) for c in self.cmd]
        t0 = time.perf_counter()
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.cwd, env=env)
        deadline = t0 + 30
        while time.perf_counter() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", self.path, headers=self.headers)
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return time.perf_counter() - t0
            except OSError:
                time.sleep(0.002)
        raise RuntimeError("%s did not answer within 30 s" % self.name)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
        return int(m.group(1))

    @property
    def url(self):
        return "http://127.0.0.1:%d%s" % (self.port, self.path)


# ----------------------------------------------------------------------------- load

def wrk_rps(target, duration, connections):
    hdrs = []
    for k, v in target.headers.items():
        hdrs += ["-H", "%s: %s" % (k, v)]
    r = subprocess.run(["wrk", "-t1", "-c%d" % connections, "-d%ds" % duration] + hdrs + [target.url],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 30)
    out = r.stdout.decode()
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError("wrk failed: %s" % out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError("%s answered %s non-2xx responses under load" % (target.name, errors.group(1)))
    return float(m.group(1))


def _client_loop(port, path, headers, duration, out):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    n, end = 0, time.perf_counter() + duration
    while time.perf_counter() < end:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        r.read()
        n += 1
    c.close()
    out.put(n)


def stdlib_rps(target, duration, connections):
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_client_loop, args=(target.port, target.path, target.headers, duration, q))
             for _ in range(connections)]
    for p in procs:
        p.start()
    total = sum(q.get() for _ in procs)
    for p in procs:
        p.join()
    return total / duration


# ----------------------------------------------------------------------------- upload

def upload_413(target, curl):
    """POST a sparse 101 MiB file as curl does; return (curl time_total ms, http code, RSS growth kB)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "big.bin")
        with open(path, "wb") as f:
            f.truncate(101 * 1024 * 1024)
        before = target.rss_kb()
        times = []
        for _ in range(5):
            r = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                                "-H", "Content-Type: application/octet-stream", "--data-binary", "@" + path,
                                "http://127.0.0.1:%d/v1/files:upload?key=LARGE_FILE_UPLOAD" % target.port],
                               stdout=subprocess.PIPE, timeout=60)
            code, total = r.stdout.decode().split()
            times.append(float(total) * 1000)
        growth = target.rss_kb() - before
    return statistics.median(times), int(code), growth


# ----------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flask", help="path of the Flask mock's main.py (tests/mock-server/main.py)")
    p.add_argument("--duration", type=int, default=5, help="seconds per load run (default 5)")
    p.add_argument("--connections", type=int, default=4, help="keep-alive connections (default 4)")
    p.add_argument("--startups", type=int, default=9, help="start-ups measured per server (median)")
    p.add_argument("--baseline-server", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.baseline_server is not None:
        run_baseline(a.baseline_server)
        return 0

    auth = {"Authorization": "Bearer " + KEY}
    targets = [
        Target("dpmock", [PY, os.path.join(HERE, "dpmock.py"), "--foreground", "-q", "--port", "{port}"],
               "/v1/models", auth),
        Target("baseline", [PY, os.path.abspath(__file__), "--baseline-server", "{port}"], "/v1/models", {}),
    ]
    if a.flask:
        targets.append(Target("flask", [PY, os.path.abspath(a.flask), "--foreground", "--port", "{port}"],
                              "/v1/models", auth, cwd=os.path.dirname(os.path.abspath(a.flask))))
    wrk = shutil.which("wrk")
    curl = shutil.which("curl")
    load = wrk_rps if wrk else stdlib_rps
    print("python %s, load generator: %s, %d connections, %d s per run"
          % (sys.version.split()[0], "wrk" if wrk else "stdlib (wrk not installed)", a.connections, a.duration))
    res = {}
    for t in targets:
        t.start()  # warm-up: caches bytecode, warms the OS file cache
        t.stop()
        starts = []
        for _ in range(a.startups):
            starts.append(t.start())
            t.stop()
        r = res[t.name] = {"startup_ms": statistics.median(starts) * 1000}
        t.start()
        try:
            time.sleep(0.2)
            r["idle_rss_mb"] = t.rss_kb() / 1024
            r["rps"] = load(t, a.duration, a.connections)
            if curl and t.name != "baseline":
                r["upload_ms"], r["upload_code"], r["upload_rss_kb"] = upload_413(t, curl)
        finally:
            t.stop()
    print()
    print("| server | start-up to first answer | keep-alive req/s | 101 MiB upload -> 413 (curl total) | "
          "RSS growth in upload | idle RSS |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        up = "%.2f ms (%d)" % (r["upload_ms"], r["upload_code"]) if "upload_ms" in r else "-"
        grow = "%d kB" % r["upload_rss_kb"] if "upload_rss_kb" in r else "-"
        print("| %s | %.0f ms | %.0f | %s | %s | %.1f MB |" % (name, r["startup_ms"], r["rps"], up, grow,
                                                              r["idle_rss_mb"]))
    d, b = res["dpmock"], res["baseline"]
    checks = [
        ("keep-alive req/s >= 85%% of baseline (%.0f%%)" % (100 * d["rps"] / b["rps"]), d["rps"] >= 0.85 * b["rps"]),
        ("idle RSS <= 24 MB (%.1f MB)" % d["idle_rss_mb"], d["idle_rss_mb"] <= 24),
    ]
    if "upload_ms" in d:
        checks += [
            ("101 MiB upload answered 413 in <= 5 ms (%.2f ms)" % d["upload_ms"],
             d["upload_ms"] <= 5 and d["upload_code"] == 413),
            ("RSS growth in upload <= 1 MB (%d kB)" % d["upload_rss_kb"], d["upload_rss_kb"] <= 1024),
        ]
    if "flask" in res:
        f = res["flask"]
        checks += [
            ("start-up >= 2.5x faster than Flask (%.1fx)" % (f["startup_ms"] / d["startup_ms"]),
             f["startup_ms"] >= 2.5 * d["startup_ms"]),
            ("keep-alive req/s >= 6x Flask (%.1fx)" % (d["rps"] / f["rps"]), d["rps"] >= 6 * f["rps"]),
        ]
    else:
        print("\n(no --flask given: the Flask comparisons are not run)")
    print()
    for text, ok in checks:
        print("%s  %s" % ("PASS" if ok else "MISS", text))
    print("\n" + json.dumps(res))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
