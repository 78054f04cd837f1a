#!/usr/bin/env python3
"""Benchmark dpmock against a bare tuned ThreadingHTTPServer and (optionally) the Flask mock.

Usage:
    python3 bench_dpmock.py [--flask PATH/TO/main.py] [--duration S] [--rounds N]

Measures, in one run: start-up to first answer, idle RSS, keep-alive small-JSON GET requests/s,
keep-alive POST /v1/chat/completions requests/s with dpmock's access log on (--logfile),
Anthropic SSE streams/s (POST /v1/messages, "stream": true, each stream read to its end), and a
101 MiB LARGE_FILE_UPLOAD through curl (curl's time_total and the server's RSS growth). Load
comes from wrk when installed, else a stdlib load generator. Exits 1 if a target is missed.

The baseline is a bare tuned ThreadingHTTPServer written to a temporary file and run as its own
small script (so its start-up and RSS are those of the bare server, not of this script). It
answers the same requests: GET with a small JSON body, the chat POST with the body dpmock gave
(read by Content-Length), and the SSE POST with dpmock's own stream, captured from dpmock at
the start of the run and replayed event by event (one chunk and one flush per event, as dpmock
writes them).

Repeatability: with 2 or more CPUs the servers are pinned to one CPU and the load generator to
the others (--no-pin: not), as where the scheduler puts a GIL-bound server's threads otherwise
changes its throughput by up to 2x from run to run. The POST and SSE loads run as pairs
(--rounds), dpmock and baseline back to back in alternating order, so drift cancels out; a pair
during which other work used more than --max-other-load CPUs (from /proc/stat, less the servers,
the load generator and this script) is disturbed and run again (--retries in all; before each
pair, each start-up series and each GET run, the script waits for a quiet half second,
--quiet-wait seconds in all), and a target
compares the median dpmock/baseline ratio of the undisturbed pairs (with fewer than 2 of them,
the median of all pairs is shown and the target counts as missed: the machine was too busy).

Every server runs under the interpreter that runs this script, so the comparison is fair:
to include the Flask mock, run it with a python that has flask installed. Servers run with
Python's default bytecode caching (PYTHONDONTWRITEBYTECODE removed from their environment),
as pip already gave Flask's modules, and after one uncounted warm-up start. Start-up is measured
a second way too: a fresh copy of each server's own files (dpmock.py, scenarios.py, dpmocklib/; the
Flask mock's folder) started with PYTHONDONTWRITEBYTECODE=1, so its own code compiles at every start.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
KEY = "EMPTY_LIST"

CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
CHAT_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-test"}

SSE_PATH = "/v1/messages"
SSE_BODY = ('{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,'
            '"messages":[{"role":"user","content":"Say hi."}]}')
SSE_HEADERS = {"Content-Type": "application/json", "x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}


# ----------------------------------------------------------------------------- the baseline

#: The bare baseline, run as its own script: python baseline.py PORT CHAT_BODY_FILE EVENTS_FILE SSE_TYPE.
#: Only http.server is imported. EVENTS_FILE holds the SSE events, NUL-separated.
BASELINE_SRC = r'''
import os, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SMALL_JSON = b'{"object": "list", "data": []}'
with open(sys.argv[2], "rb") as f:
    CHAT = f.read()
with open(sys.argv[3], "rb") as f:
    EVENTS = f.read().split(b"\0")
SSE_TYPE = sys.argv[4]


class Bare(BaseHTTPRequestHandler):
    """The tuned stdlib baseline: HTTP/1.1, buffered writes, TCP_NODELAY, no log."""

    protocol_version = "HTTP/1.1"
    wbufsize = -1
    disable_nagle_algorithm = True

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(SMALL_JSON)))
        self.end_headers()
        self.wfile.write(SMALL_JSON)  # one write: handle_one_request flushes it

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/messages":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(CHAT)))
            self.end_headers()
            self.wfile.write(CHAT)
            return
        # the stream as dpmock writes it: the head, then one chunk per event, each flushed on its own
        self.send_response(200)
        self.send_header("Content-Type", SSE_TYPE)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.flush()
        for ev in EVENTS:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


srv = Server(("127.0.0.1", int(sys.argv[1])), Bare)
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
srv.serve_forever()
'''


# ----------------------------------------------------------------------------- processes

#: CPUs for the servers and for the load generators (None: not pinned); set by main()
PIN = {"server": None, "load": None}


def _pinned(role):
    """A preexec_fn that pins the child to its role's CPUs (None when not pinning)."""
    cpus = PIN[role]
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def fresh_copy(src, dest, names):
    """A copy of ``names`` of folder ``src`` in ``dest`` without bytecode (nor dpmock's tests); returns ``dest``."""
    os.makedirs(dest)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "tests", ".git")
    for name in names:
        path = os.path.join(src, name)
        if os.path.isdir(path):
            if name not in ("__pycache__", ".git"):
                shutil.copytree(path, os.path.join(dest, name), ignore=skip)
        elif not name.endswith(".pyc"):
            shutil.copy2(path, dest)
    return dest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    """One server under test, started as a child process."""

    def __init__(self, name, cmd, path, headers, cwd=None, fresh=None):
        self.name, self.cmd, self.path, self.headers, self.cwd = name, cmd, path, headers, cwd
        self.fresh = fresh  #: (cmd, cwd) of a fresh copy with no bytecode cache, for the uncached start-ups
        self.proc = None
        self.port = None
        self.errors = 0  #: socket errors and timeouts (over 10 s) the load generator saw

    def start(self, cached=True):
        """Start it; return seconds from spawn to the first 200 answer. ``cached=False``: its fresh copy, with
        PYTHONDONTWRITEBYTECODE=1, so its own modules compile at every start (the standard library's do not)."""
        self.port = free_port()
        cmd, cwd = (self.cmd, self.cwd) if cached or self.fresh is None else self.fresh
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        t0 = time.perf_counter()
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if not cached:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, env=env,
                                     preexec_fn=_pinned("server"))
        deadline = t0 + 30
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited (status %s) before answering: %s" % (self.name, self.proc.returncode,
                                                                                  " ".join(cmd)))
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


class Load:
    """One kind of request to put a server under: method, path, headers, body."""

    def __init__(self, name, method, path, headers, body=None):
        self.name, self.method, self.path, self.headers, self.body = name, method, path, headers, body


# ----------------------------------------------------------------------------- load

def _lua_string(s):
    level = "=" * 4
    assert "]%s]" % level not in s
    return "[%s[%s]%s]" % (level, s, level)


def wrk_rps(port, load, duration, connections, threads=1):
    """Complete responses per second (wrk reads chunked answers to their last chunk)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("wrk.method = %s\n" % _lua_string(load.method))
        if load.body is not None:
            f.write("wrk.body = %s\n" % _lua_string(load.body))
        for k, v in load.headers.items():
            f.write("wrk.headers[ %s ] = %s\n" % (_lua_string(k), _lua_string(v)))
        script = f.name
    try:
        r = subprocess.run(["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration, "--timeout", "10s",
                            "-s", script, "http://127.0.0.1:%d%s" % (port, load.path)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 30,
                           preexec_fn=_pinned("load"))
    finally:
        os.unlink(script)
    out = r.stdout.decode()
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    if not m or not n:
        raise RuntimeError("wrk failed: %s" % out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError("%s: %s non-2xx responses under load" % (load.name, errors.group(1)))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return float(m.group(1)), int(n.group(1)), sum(int(x) for x in sock.groups()) if sock else 0


def _client_loop(port, load, duration, out, cpus):
    if cpus:
        os.sched_setaffinity(0, cpus)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = load.body.encode() if load.body is not None else None
    n, bad, end = 0, 0, time.perf_counter() + duration
    while time.perf_counter() < end:
        c.request(load.method, load.path, body=body, headers=load.headers)
        r = c.getresponse()
        r.read()  # a chunked answer is read to its last chunk
        bad += r.status != 200
        n += 1
    c.close()
    out.put((n, bad))


def stdlib_rps(port, load, duration, connections, threads=1):
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_client_loop, args=(port, load, duration, q, PIN["load"]))
             for _ in range(connections)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    total, bad = sum(r[0] for r in results), sum(r[1] for r in results)
    if bad:
        raise RuntimeError("%s: %d non-200 responses under load" % (load.name, bad))
    return total / duration, total, 0


_HZ = os.sysconf("SC_CLK_TCK")


def _system_busy():
    """CPU seconds the machine has spent busy (user, nice, system, steal), all CPUs together."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + (v[7] if len(v) > 7 else 0)) / _HZ


def _process_cpu(pid):
    """CPU seconds (user + system, all threads) a running process has used."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _HZ


def _rusage(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class Quiet:
    """Waits for other work on the machine to pause, within a budget of seconds for the whole run."""

    def __init__(self, limit, budget):
        self.limit, self.budget, self.waited = limit, budget, 0.0

    def wait(self):
        """Wait for a half second in which the machine used <= limit CPUs (while the budget lasts)."""
        t0 = time.perf_counter()
        while True:
            b0, w0 = _system_busy(), time.perf_counter()
            time.sleep(0.5)
            now = time.perf_counter()
            if (_system_busy() - b0) / (now - w0) <= self.limit or self.waited + now - t0 >= self.budget:
                self.waited += now - t0
                return


def measured(load, target, ld, duration, connections, threads):
    """One load run: (responses/s, responses, server CPU us per response, other load in CPUs).

    The other load is what the machine did beside this server, the load generator and this
    script (other processes, steal): the run's figures are only comparable when it is small.
    """
    sys0, srv0 = _system_busy(), _process_cpu(target.proc.pid)
    own0 = _rusage(resource.RUSAGE_SELF) + _rusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        rps, n, errors = load(target.port, ld, duration, connections, threads)
    except (RuntimeError, OSError) as e:
        raise RuntimeError("%s: %s" % (target.name, e))
    target.errors += errors
    elapsed = time.perf_counter() - t0
    srv = _process_cpu(target.proc.pid) - srv0
    own = _rusage(resource.RUSAGE_SELF) + _rusage(resource.RUSAGE_CHILDREN) - own0
    other = max(0.0, (_system_busy() - sys0 - srv - own) / elapsed)
    return rps, n, 1e6 * srv / max(n, 1), other


# ----------------------------------------------------------------------------- the captured answers

def raw_exchange(port, load):
    """Send one request on a fresh connection; return (status, headers dict, body chunks list)."""
    body = (load.body or "").encode()
    head = "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (load.method, load.path, port)
    head += "".join("%s: %s\r\n" % kv for kv in load.headers.items())
    head += "Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode("latin-1") + body)
        data = b""
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            data += piece
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return status, headers, [rest[:int(headers.get("content-length", len(rest)))]]
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return status, headers, chunks
        chunks.append(rest[:size])
        if rest[size:size + 2] != b"\r\n":
            raise RuntimeError("bad chunk framing in %s answer" % load.name)
        rest = rest[size + 2:]


def capture(port, chat, sse):
    """dpmock's answers to the chat POST and the SSE POST, for the baseline to replay."""
    status, headers, body = raw_exchange(port, chat)
    if status != 200:
        raise RuntimeError("dpmock answered %s %d: %r" % (chat.path, status, b"".join(body)[:300]))
    json.loads(b"".join(body))
    status, headers, events = raw_exchange(port, sse)
    if status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
        raise RuntimeError("dpmock answered %s %d (%s): %r" % (sse.path, status, headers.get("content-type"),
                                                              b"".join(events)[:300]))
    if not events or b"event: message_stop" not in events[-1] or any(b"\0" in e for e in events):
        raise RuntimeError("dpmock's stream does not end with message_stop: %r" % b"".join(events)[-300:])
    return b"".join(body), events, headers["content-type"]


def check_replay(port, sse, events):
    """The baseline must write the very same events, one chunk each."""
    status, headers, got = raw_exchange(port, sse)
    if status != 200 or got != events:
        raise RuntimeError("the baseline's stream differs from dpmock's")


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
                               stdout=subprocess.PIPE, timeout=60, preexec_fn=_pinned("load"))
            code, total = r.stdout.decode().split()
            times.append(float(total) * 1000)
        growth = target.rss_kb() - before
    return statistics.median(times), int(code), growth


# ----------------------------------------------------------------------------- main

# ----------------------------------------------------------------------------- scale: bursts, paced streams, waiters, rules

_BURST_CLIENT = r"""
import asyncio, json, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
REQ = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\nConnection: close\r\n\r\n"
async def one(out, t0):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
        w.write(REQ)
        await w.drain()
        data = await asyncio.wait_for(r.read(), 30)
        out.append(time.monotonic() - t0 if data.startswith(b"HTTP/1.1 200") else None)
        w.close()
    except (OSError, asyncio.TimeoutError):
        out.append(None)
async def main():
    out, t0 = [], time.monotonic()
    await asyncio.gather(*[one(out, t0) for _ in range(n)])
    ok = sorted(x for x in out if x is not None)
    print(json.dumps({"answered": len(ok), "slowest_s": ok[-1] if ok else None}))
asyncio.run(main())
"""

_STREAMS_CLIENT = r"""
import asyncio, json, sys, time
port, n, ttft, tps, events = (int(x) for x in sys.argv[1:6])
BODY = json.dumps({"model": "gpt-4o", "stream": True, "max_tokens": events,
                   "messages": [{"role": "user", "content": " ".join("w%d" % i for i in range(events))}]}).encode()
REQ = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
       b"X-DP-Scenario: STREAM_SLOW; ttft_ms=%d; tps=%d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
       % (ttft, tps, len(BODY), BODY))
async def one(res):
    t0 = time.monotonic()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
        w.write(REQ)
        await w.drain()
        await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 60)
        times = []
        while True:
            chunk = await asyncio.wait_for(r.read(65536), 60)
            if not chunk:
                break
            times += [time.monotonic()] * chunk.count(b"data: ")
        w.close()
        res.append((t0, times))
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        res.append((t0, None))
async def main():
    res = []
    await asyncio.gather(*[one(res) for _ in range(n)])
    done = [(t0, t) for t0, t in res if t and len(t) >= events]
    ttft_s = sorted(t[0] - t0 for t0, t in done)
    gaps = sorted(b - a for _, t in done for a, b in zip(t[1:], t[2:]))
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None
    print(json.dumps({"completed": len(done), "ttft_p99_s": q(ttft_s, 0.99), "gap_p99_s": q(gaps, 0.99)}))
asyncio.run(main())
"""


def run_client(source, *args, timeout=120):
    r = subprocess.run([PY, "-c", source] + [str(a) for a in args], stdout=subprocess.PIPE, timeout=timeout)
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def _control(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request(method, path, body)
    r = c.getresponse()
    r.read()
    c.close()
    if r.status != 200:
        raise RuntimeError("dpmock answered %s %s with HTTP %d" % (method, path, r.status))


def waiters_and_rules(dpmock, load, duration, connections, threads, rounds=3):
    """GET req/s with 8 journal long-polls held, and chat req/s with 1,000 rules loaded, each against
    the same server without them, in alternating runs (the medians are compared)."""
    t = Target("dpmock (scale)", [PY, dpmock, "--foreground", "-q", "--port", "{port}"], "/v1/models",
               {"Authorization": "Bearer sk-test"})
    get = Load("GET /v1/models", "GET", "/v1/models", {"Authorization": "Bearer sk-test"})
    chat = Load("POST " + CHAT_PATH, "POST", CHAT_PATH, CHAT_HEADERS, CHAT_BODY)
    rules = json.dumps([{"id": "r%d" % i, "match": {"text": "question number %d about the weather" % i},
                         "respond": {"text": "answer %d" % i}} for i in range(1000)]).encode()
    runs = {"get_rps": [], "get_rps_8_waiters": [], "chat_rps": [], "chat_rps_1000_rules": []}
    t.start()
    try:
        for _ in range(rounds):
            runs["get_rps"].append(measured(load, t, get, duration, connections, threads)[0])
            polls = [subprocess.Popen([PY, "-c", "import http.client; c = http.client.HTTPConnection('127.0.0.1', %d, "
                                       "timeout=120); c.request('GET', '/_control/requests?path=/never/%d&wait_for=1"
                                       "&timeout=60'); c.getresponse().read()" % (t.port, i)]) for i in range(8)]
            time.sleep(0.5)
            try:
                runs["get_rps_8_waiters"].append(measured(load, t, get, duration, connections, threads)[0])
            finally:
                for proc in polls:
                    proc.kill()
                    proc.wait()
            runs["chat_rps"].append(measured(load, t, chat, duration, connections, threads)[0])
            _control(t.port, "POST", "/_control/rules", rules)
            runs["chat_rps_1000_rules"].append(measured(load, t, chat, duration, connections, threads)[0])
            _control(t.port, "DELETE", "/_control/rules")
    finally:
        t.stop()
    out = {k: statistics.median(v) for k, v in runs.items()}
    out["runs"] = {k: [round(x) for x in v] for k, v in runs.items()}
    return out


def scale(dpmock, load, a):
    """The load-testing figures: a burst of connects, many paced streams, waiters and rules."""
    t = Target("dpmock (burst)", [PY, dpmock, "--foreground", "-q", "--port", "{port}"], "/v1/models",
               {"Authorization": "Bearer sk-test"})
    out = {}
    t.start()
    try:
        out["burst"] = run_client(_BURST_CLIENT, t.port, a.burst)
    finally:
        t.stop()
    t.start()
    try:
        out["streams"] = run_client(_STREAMS_CLIENT, t.port, a.streams, 200, 10, 16, timeout=300)
    finally:
        t.stop()
    out.update(waiters_and_rules(dpmock, load, a.duration, a.connections, a.wrk_threads))
    return out


def scale_checks(sc, a):
    burst, streams = sc["burst"], sc["streams"]
    ideal_ttft, ideal_gap = 0.2, 0.1
    return [
        ("%d near-simultaneous connects all answered within 1 s (%d answered, slowest %.2f s)"
         % (a.burst, burst["answered"], burst["slowest_s"] or -1),
         burst["answered"] == a.burst and (burst["slowest_s"] or 99) <= 1.0),
        ("%d paced streams (ttft 200 ms, 10 events/s) all complete (%d)" % (a.streams, streams["completed"]),
         streams["completed"] == a.streams),
        ("paced streams: TTFT p99 <= ideal + 250 ms (%.2f s)" % (streams["ttft_p99_s"] or -1),
         streams["ttft_p99_s"] is not None and streams["ttft_p99_s"] <= ideal_ttft + 0.25),
        ("paced streams: gap p99 <= 1.5x ideal (%.3f s)" % (streams["gap_p99_s"] or -1),
         streams["gap_p99_s"] is not None and streams["gap_p99_s"] <= 1.5 * ideal_gap),
        ("8 journal long-polls cost <= 10%% of keep-alive GET req/s (%.0f vs %.0f)"
         % (sc["get_rps_8_waiters"], sc["get_rps"]), sc["get_rps_8_waiters"] >= 0.9 * sc["get_rps"]),
        ("1,000 rules cost <= 10%% of keep-alive chat req/s (%.0f vs %.0f)"
         % (sc["chat_rps_1000_rules"], sc["chat_rps"]), sc["chat_rps_1000_rules"] >= 0.9 * sc["chat_rps"]),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flask", help="path of the Flask mock's main.py (tests/mock-server/main.py)")
    p.add_argument("--duration", type=int, default=3, help="seconds per load run (default 3)")
    p.add_argument("--rounds", type=int, default=5,
                   help="paired dpmock/baseline runs of each of the POST and SSE loads (default 5)")
    p.add_argument("--connections", type=int, default=4, help="keep-alive connections for GET (default 4)")
    p.add_argument("--post-connections", type=int, default=16,
                   help="keep-alive connections for the chat POST, access log on (default 16)")
    p.add_argument("--sse-connections", type=int, default=8,
                   help="keep-alive connections for the SSE streams (default 8)")
    p.add_argument("--max-other-load", type=float, default=0.10,
                   help="CPUs used by other work on the machine above which a GET run or POST/SSE pair counts as "
                        "disturbed (default 0.10)")
    p.add_argument("--retries", type=int, default=6,
                   help="disturbed GET runs and POST/SSE pairs run again, in all (default 6)")
    p.add_argument("--quiet-wait", type=float, default=45,
                   help="seconds, in all, to wait for other work on the machine to pause (default 45)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the servers to one CPU and the load generator to the others")
    p.add_argument("--startups", type=int, default=9, help="start-ups measured per server (median)")
    p.add_argument("--burst", type=int, default=1000, help="near-simultaneous connects (default 1000)")
    p.add_argument("--streams", type=int, default=2000, help="concurrent paced streams (default 2000)")
    p.add_argument("--no-scale", action="store_true", help="skip the burst, paced-stream, waiter and rule figures")
    p.add_argument("--scale-only", action="store_true", help="only the burst, paced-stream, waiter and rule figures")
    p.add_argument("--dpmock", default=os.path.join(HERE, "dpmock.py"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dpmock = os.path.abspath(a.dpmock)
    if a.scale_only:
        load = wrk_rps if shutil.which("wrk") else stdlib_rps
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2 and not a.no_pin:
            PIN["server"], PIN["load"] = {cpus[0]}, set(cpus[1:])
        sc = scale(dpmock, load, a)
        print("scale: %s\n" % json.dumps(sc))
        checks = scale_checks(sc, a)
        for text, ok in checks:
            print("%s  %s" % ("PASS" if ok else "MISS", text))
        return 0 if all(ok for _, ok in checks) else 1

    wrk = shutil.which("wrk")
    curl = shutil.which("curl")
    load = wrk_rps if wrk else stdlib_rps
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2 and not a.no_pin:
        PIN["server"], PIN["load"] = {cpus[0]}, set(cpus[1:])
    get = Load("GET /v1/models", "GET", "/v1/models", {"Authorization": "Bearer " + KEY})
    chat = Load("POST " + CHAT_PATH, "POST", CHAT_PATH, CHAT_HEADERS, CHAT_BODY)
    sse = Load("POST %s (stream)" % SSE_PATH, "POST", SSE_PATH, SSE_HEADERS, SSE_BODY)
    print("python %s, dpmock %s\nload generator: %s, %d s per run, %d pairs each for POST and SSE; %d CPUs, %s"
          % (sys.version.split()[0], dpmock, "wrk -t%d" % a.wrk_threads if wrk else "stdlib (wrk not installed)",
             a.duration, a.rounds, len(cpus),
             "servers pinned to CPU %s, load to CPU %s" % (",".join(map(str, sorted(PIN["server"]))),
                                                           ",".join(map(str, sorted(PIN["load"]))))
             if PIN["server"] else "not pinned"), flush=True)

    tmp = tempfile.mkdtemp(prefix="bench_dpmock.")
    logfile = os.path.join(tmp, "dpmock.log")
    logged = Target("dpmock (log on)", [PY, dpmock, "--foreground", "--port", "{port}", "--logfile", logfile],
                    get.path, get.headers)
    running = [logged]
    res = {}
    try:
        # dpmock's own answers, for the baseline to replay byte for byte
        logged.start()
        chat_body, events, sse_type = capture(logged.port, chat, sse)
        chat_file, events_file, baseline_py = (os.path.join(tmp, n) for n in ("chat.json", "events", "baseline.py"))
        with open(chat_file, "wb") as f:
            f.write(chat_body)
        with open(events_file, "wb") as f:
            f.write(b"\0".join(events))
        with open(baseline_py, "w") as f:
            f.write(BASELINE_SRC)
        print("captured from dpmock: a %d-byte chat answer, a %d-event stream of %d bytes (%s)"
              % (len(chat_body), len(events), sum(map(len, events)), sse_type), flush=True)

        fresh_dpmock = fresh_copy(os.path.dirname(dpmock), os.path.join(tmp, "fresh-dpmock"),
                                  ("dpmock.py", "scenarios.py", "dpmocklib"))
        dpmock_args = ["--foreground", "-q", "--port", "{port}"]
        baseline_cmd = [PY, baseline_py, "{port}", chat_file, events_file, sse_type]
        targets = [
            Target("dpmock", [PY, dpmock] + dpmock_args, get.path, get.headers,
                   fresh=([PY, os.path.join(fresh_dpmock, os.path.basename(dpmock))] + dpmock_args, None)),
            Target("baseline", baseline_cmd, get.path, {}, fresh=(baseline_cmd, None)),
        ]
        if a.flask:
            flask_dir = os.path.dirname(os.path.abspath(a.flask))
            fresh_flask = fresh_copy(flask_dir, os.path.join(tmp, "fresh-flask"), os.listdir(flask_dir))
            flask_args = ["--foreground", "--port", "{port}"]
            targets.append(Target("flask", [PY, os.path.abspath(a.flask)] + flask_args, get.path, get.headers,
                                  cwd=flask_dir, fresh=([PY, os.path.join(fresh_flask, os.path.basename(a.flask))]
                                                        + flask_args, fresh_flask)))

        # start-up, idle RSS (after start and its one request), GET req/s, upload: one server at a time
        quiet = Quiet(a.max_other_load, a.quiet_wait)
        retries = a.retries
        for t in targets:
            quiet.wait()
            t.start()  # warm-up: caches bytecode, warms the OS file cache
            t.stop()
            starts = []
            for _ in range(a.startups):
                starts.append(t.start())
                t.stop()
            r = res[t.name] = {"startup_ms": statistics.median(starts) * 1000}
            quiet.wait()
            t.start(cached=False)  # warm-up of the OS file cache; the fresh copy stays without bytecode
            t.stop()
            starts = []
            for _ in range(a.startups):
                starts.append(t.start(cached=False))
                t.stop()
            r["startup_nocache_ms"] = statistics.median(starts) * 1000
            running.append(t)
            t.start()
            time.sleep(0.2)
            r["idle_rss_mb"] = t.rss_kb() / 1024
            while True:
                quiet.wait()
                rps, _, _, other = measured(load, t, get, a.duration, a.connections, a.wrk_threads)
                if "rps" not in r or other < r["get_other_load"]:
                    r["rps"], r["get_other_load"] = rps, other
                if other <= a.max_other_load or retries <= 0:
                    break
                retries -= 1
            if curl and t.name != "baseline":
                r["upload_ms"], r["upload_code"], r["upload_rss_kb"] = upload_413(t, curl)
            if t.name != "baseline":
                t.stop()
                running.remove(t)
        base = targets[1]
        check_replay(base.port, sse, events)

        # POST with the access log on, and SSE streams: dpmock (--logfile) and baseline back to back, in
        # alternating order. A pair during which other work used the machine is run again (within
        # --retries in all); the verdict takes the median ratio over the undisturbed pairs.
        pairs = [("dpmock", logged), ("baseline", base)]
        rounds = {"post": [], "sse": []}
        answered = 0
        for i in range(a.rounds):
            for kind, ld, conns in (("post", chat, a.post_connections), ("sse", sse, a.sse_connections)):
                best = None
                while True:
                    quiet.wait()
                    got = {}
                    for name, t in pairs if i % 2 == 0 else pairs[::-1]:
                        got[name] = measured(load, t, ld, a.duration, conns, a.wrk_threads)
                        if name == "dpmock" and kind == "post":
                            answered += got[name][1]
                    got["other"] = max(g[3] for g in got.values())
                    if best is None or got["other"] < best["other"]:
                        best = got
                    if got["other"] <= a.max_other_load or retries <= 0:
                        break
                    retries -= 1
                rounds[kind].append(best)
        for kind, rs in rounds.items():
            calm = [g for g in rs if g["other"] <= a.max_other_load]
            use = calm if len(calm) >= min(2, len(rs)) else rs
            for name, _ in pairs:
                res[name][kind + "_rps"] = statistics.median(g[name][0] for g in use)
                res[name][kind + "_cpu_us"] = statistics.median(g[name][2] for g in use)
            d = res["dpmock"]
            d[kind + "_rounds"] = [[round(g["dpmock"][0]), round(g["baseline"][0]), round(g["other"], 2)] for g in rs]
            d[kind + "_ratio"] = statistics.median(g["dpmock"][0] / g["baseline"][0] for g in use)
            d[kind + "_calm"] = use is calm
            d[kind + "_used"] = "%d undisturbed of %d" % (len(use), len(rs)) if use is calm else \
                "all %d, %d undisturbed" % (len(rs), len(calm))
        res["dpmock"]["quiet_wait_s"] = round(quiet.waited, 1)
        for t in targets:
            res[t.name]["socket_errors"] = t.errors + (logged.errors if t.name == "dpmock" else 0)
        logged.stop()
        with open(logfile, "rb") as f:
            log_lines = f.read().count(b'"POST %s' % CHAT_PATH.encode())
        res["dpmock"]["post_log_lines"], res["dpmock"]["post_answered"] = log_lines, answered
    finally:
        for t in running:
            t.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def fmt(r, key, f="%.0f"):
        return f % r[key] if key in r else "-"

    print()
    print("| server | start-up to first answer | the same, no bytecode cache | idle RSS | GET req/s (%d conn) "
          "| POST chat req/s, log on (%d conn) | SSE streams/s (%d conn) | 101 MiB upload -> 413 (curl total) "
          "| RSS growth in upload |" % (a.connections, a.post_connections, a.sse_connections))
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        up = "%.2f ms (%d)" % (r["upload_ms"], r["upload_code"]) if "upload_ms" in r else "-"
        print("| %s | %.0f ms | %.0f ms | %.1f MB | %.0f | %s | %s | %s | %s |"
              % (name, r["startup_ms"], r["startup_nocache_ms"], r["idle_rss_mb"], r["rps"], fmt(r, "post_rps"),
                 fmt(r, "sse_rps"), up, fmt(r, "upload_rss_kb", "%d kB")))
    d, b = res["dpmock"], res["baseline"]
    print()
    for kind, label in (("post", "POST req/s, log on"), ("sse", "SSE streams/s")):
        print("%s, dpmock/baseline per pair (CPUs used by other work): %s" % (label, ", ".join(
            "%d/%d = %.0f%% (%.2f%s)" % (x, y, 100.0 * x / y, o, "" if o <= a.max_other_load else ", disturbed")
            for x, y, o in d[kind + "_rounds"])))
        print("  server CPU per answer: dpmock %.0f us, baseline %.0f us" % (d[kind + "_cpu_us"], b[kind + "_cpu_us"]))
    print("GET req/s: CPUs used by other work during the run: %s" % ", ".join(
        "%s %.2f%s" % (name, r["get_other_load"], "" if r["get_other_load"] <= a.max_other_load else " (disturbed)")
        for name, r in res.items()))
    if res["dpmock"]["quiet_wait_s"] >= 1:
        print("(waited %.0f s in all for other work on the machine to pause)" % res["dpmock"]["quiet_wait_s"])
    if load is stdlib_rps:
        print("WARNING: without wrk the stdlib load generator may itself be the bottleneck (ratios then near "
              "100%%): install wrk for figures that measure the servers")
    noisy = [kind for kind in ("post", "sse") if d[kind + "_used"].startswith("all")]
    if noisy:
        print("WARNING: other work kept the machine busy (> %.2f CPUs) during most %s pairs: those figures are "
              "noisy; run again on a quiet machine" % (a.max_other_load, " and ".join(k.upper() for k in noisy)))
    busy = "; the machine was busy: run again"
    get_calm = all(r["get_other_load"] <= a.max_other_load for r in res.values())
    checks = [
        ("keep-alive GET req/s >= 85%% of baseline (%.0f%%%s)" % (100 * d["rps"] / b["rps"], "" if get_calm else busy),
         d["rps"] >= 0.85 * b["rps"] and get_calm),
        ("keep-alive POST req/s with the access log on >= 90%% of baseline (%.0f%%, median of %s pairs%s)"
         % (100 * d["post_ratio"], d["post_used"], "" if d["post_calm"] else busy),
         d["post_ratio"] >= 0.90 and d["post_calm"]),
        ("access log written: %d lines for %d chat POSTs answered under load"
         % (d["post_log_lines"], d["post_answered"]),
         d["post_log_lines"] >= d["post_answered"]),
        ("SSE streams/s >= 90%% of the bare server (%.0f%%, median of %s pairs%s)"
         % (100 * d["sse_ratio"], d["sse_used"], "" if d["sse_calm"] else busy),
         d["sse_ratio"] >= 0.90 and d["sse_calm"]),
        ("idle RSS <= baseline + 4 MB (%.1f MB, baseline %.1f MB)" % (d["idle_rss_mb"], b["idle_rss_mb"]),
         d["idle_rss_mb"] <= b["idle_rss_mb"] + 4),
        ("start-up <= 1.5x baseline (%.2fx: %.0f ms vs %.0f ms)" % (
            d["startup_ms"] / b["startup_ms"], d["startup_ms"], b["startup_ms"]),
         d["startup_ms"] <= 1.5 * b["startup_ms"]),
        ("start-up without a bytecode cache <= 2x baseline (%.2fx: %.0f ms vs %.0f ms)" % (
            d["startup_nocache_ms"] / b["startup_nocache_ms"], d["startup_nocache_ms"], b["startup_nocache_ms"]),
         d["startup_nocache_ms"] <= 2 * b["startup_nocache_ms"]),
    ]
    checks.append(("no socket errors or timeouts under load (%d)" % d["socket_errors"], d["socket_errors"] == 0))
    others = ["%s %d" % (n, r["socket_errors"]) for n, r in res.items() if n != "dpmock" and r["socket_errors"]]
    if others:
        print("WARNING: socket errors or timeouts under load: %s" % ", ".join(others))
    if "upload_ms" in d:
        checks += [
            ("101 MiB upload answered 413 in <= 5 ms (%.2f ms)" % d["upload_ms"],
             d["upload_ms"] <= 5 and d["upload_code"] == 413),
            ("RSS growth in upload <= 1 MB (%d kB)" % d["upload_rss_kb"], d["upload_rss_kb"] <= 1024),
        ]
    if "flask" in res:
        f = res["flask"]
        checks += [
            ("start-up faster than Flask (%.0f ms vs %.0f ms)" % (d["startup_ms"], f["startup_ms"]),
             d["startup_ms"] < f["startup_ms"]),
            ("start-up without a bytecode cache faster than Flask's (%.0f ms vs %.0f ms)"
             % (d["startup_nocache_ms"], f["startup_nocache_ms"]), d["startup_nocache_ms"] < f["startup_nocache_ms"]),
            ("keep-alive GET req/s >= 6x Flask (%.1fx%s)" % (d["rps"] / f["rps"], "" if get_calm else busy),
             d["rps"] >= 6 * f["rps"] and get_calm),
        ]
    else:
        print("\n(no --flask given: the Flask comparisons are not run)")
    if not a.no_scale:
        sc = res["dpmock"]["scale"] = scale(dpmock, load, a)
        print("\nscale: %s" % json.dumps(sc))
        checks += scale_checks(sc, a)
    print()
    for text, ok in checks:
        print("%s  %s" % ("PASS" if ok else "MISS", text))
    print("\n" + json.dumps(res))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
