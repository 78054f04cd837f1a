"""What the test modules share: a dpmock process (Server) and the one started for the whole run
(SERVER), raw-socket and SSE helpers, request builders per provider, and optional packages."""

import atexit
import http.client
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def _optional(name):
    """An optional package, loaded by name (the project imports none): None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


#: When installed (the CI venv has them), generated instances are validated with these.
jsonschema, pydantic = _optional("jsonschema"), _optional("pydantic")

#: The folder that holds dpmock.py, scenarios.py and the package (a checkout or a vendored copy).
HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if HERE not in sys.path:  # `import dpmock` from any working directory
    sys.path.insert(0, HERE)
DPMOCK = os.path.join(HERE, "dpmock.py")
DPMOCKCTL = os.path.join(HERE, "dpmockctl.py")
PY = sys.executable
CURL = shutil.which("curl")
MIB = 1024 * 1024


class Server:
    """A dpmock process in the foreground on a free port; stop() always reaps it."""

    def __init__(self, *args, logfile=None, sub=(), env=None):
        self.logfile = logfile
        cmd = [PY, DPMOCK] + list(sub) + ["--foreground", "--port", "0"] + list(args)  # sub: ("record", DIR)
        if logfile:
            cmd += ["--logfile", logfile]
        # stderr (the access log) goes to a file: an unread pipe would fill up and block the server
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, cwd=HERE, env=env)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("DP_MOCK_SERVER="):
            self.stop()
            raise RuntimeError("dpmock did not start: %r %r" % (line, self.errors()))
        self.url = line.strip().split("=", 1)[1]
        self.host, port = self.url[len("http://"):].rsplit(":", 1)
        self.port = int(port)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        if not self.stderr.closed:
            self.stderr_text = self.errors()
            self.stderr.close()
        return self.proc.returncode

    def errors(self):
        """What the server wrote to stderr so far."""
        if self.stderr.closed:
            return self.stderr_text
        self.stderr.seek(0)
        return self.stderr.read()

    def conn(self, timeout=10):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=10):
        """One request on a fresh connection; returns (status, headers dict lowercased, body bytes)."""
        c = self.conn(timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def raw(self, data, timeout=5):
        """Send raw bytes, return everything the server sends until it closes (or the timeout)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(data)
            return recv_all(s)


def raw_request(path, headers, body=b"", method="POST", close=False):
    """The bytes of one request (a dict body is sent as JSON), for raw sockets."""
    body = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    head = "%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s" % (
        method, path, len(body), "Connection: close\r\n" if close else "")
    head += "".join("%s: %s\r\n" % kv for kv in headers.items())
    return head.encode() + b"\r\n" + body


def recv_all(sock):
    chunks = []
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            chunks.append(piece)
    except socket.timeout:
        pass
    return b"".join(chunks)


def recv_until_reset(s):
    """Everything received before the server reset the connection; AssertionError if it ended otherwise."""
    got = b""
    try:
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            got += piece
    except ConnectionResetError:
        return got
    raise AssertionError("the connection ended without a reset, after %r" % got[:80])


def split_response(raw):
    """Split one raw HTTP response into (status, headers dict, body bytes as framed, rest)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        parts, rest = decode_chunks(rest)
        body = b"".join(parts)
    else:
        n = int(headers.get("content-length", "0"))
        body, rest = rest[:n], rest[n:]
    return status, headers, body, rest


def decode_chunks(data, strict=True):
    """The chunk payloads of a chunked body, and the bytes after its final chunk.

    ``strict`` asserts the framing (size lines, CRLFs, the final chunk); otherwise decoding
    stops quietly where a cut-off body ends.
    """
    out = []
    while True:
        line, sep, rest = data.partition(b"\r\n")
        if not strict and (not sep or not line):
            return out, b""
        assert sep, "chunk size line not terminated"
        size = int(line, 16)
        if size == 0:
            if strict:
                assert rest.startswith(b"\r\n"), "final chunk not followed by CRLF"
            return out, rest[2:]
        if not strict and len(rest) < size:
            return out, b""
        out.append(rest[:size])
        if strict:
            assert rest[size:size + 2] == b"\r\n", "chunk not followed by CRLF"
        data = rest[size + 2:]


def sse_events(payload):
    """Parse SSE text into a list of (event name or None, data string)."""
    events = []
    for block in payload.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((name, data))
    return events


def run(cmd, timeout=30, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_gone(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def kill_pidfile(path):
    """Cleanup for daemons: SIGKILL whatever pid the file names, if it is still alive."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


ROUTE_PATHS = {
    "chat": ("POST", "/chat/completions"),
    "images": ("POST", "/images/generations"),
    "files": ("POST", "/files"),
    "messages": ("POST", "/messages"),
    "messages_count_tokens": ("POST", "/messages/count_tokens"),
    "gemini_generate": ("POST", "/models/gemini-2.5-flash:generateContent"),
    "gemini_stream": ("POST", "/models/gemini-2.5-flash:streamGenerateContent"),
    "gemini_count_tokens": ("POST", "/models/gemini-2.5-flash:countTokens"),
    "gemini_predict": ("POST", "/models/imagen-4.0-generate-001:predict"),
    "gemini_upload": ("POST", "/files:upload"),
    "models": ("GET", "/models"),
    "models_get": ("GET", "/models/gpt-4o"),
}

ANTHROPIC_ROUTES = ("messages", "messages_count_tokens")
GEMINI_ROUTES = ("gemini_generate", "gemini_stream", "gemini_count_tokens", "gemini_predict", "gemini_upload")


# ---- requests per provider: one builder for each body and for each provider's key headers

def openai_chat(text="Hi there", stream=False, model="gpt-4o"):
    """A Chat Completions body as the SDKs send it (``stream`` only when True)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return dict(body, stream=True) if stream else body


def anthropic_messages(text="Hi there", stream=False, max_tokens=100):
    body = {"model": "claude-sonnet-4-5", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}
    return dict(body, stream=True) if stream else body


def gemini_contents(text="Hi there"):
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


def openai_headers(key):
    return {"Authorization": "Bearer " + key}


def anthropic_headers(key):
    return {"x-api-key": key, "anthropic-version": "2023-06-01"}


def gemini_headers(key):
    return {"x-goog-api-key": key}


def key_headers(route, key):
    """Put the key where the C library puts it for that provider."""
    return anthropic_headers(key) if route in ANTHROPIC_ROUTES else openai_headers(key)


def ctl(*args, **kw):
    """dpmockctl.py with these arguments (``run``'s keywords: env, timeout, ...)."""
    return run([PY, DPMOCKCTL] + list(args), **kw)


def provider_of_route(route, headers, prefix):
    if route in ANTHROPIC_ROUTES or "x-api-key" in headers:
        return "anthropic"
    if route in GEMINI_ROUTES or prefix == "/v1beta":
        return "gemini"
    return "openai"


CHAT = json.dumps(openai_chat()).encode()
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                                   "unit": {"type": "string", "enum": ["C", "F"]}},
                  "required": ["city"]}


def post_raw(body, path, headers):
    """POST over a raw socket with Connection: close; returns the whole raw response."""
    return SERVER.raw(raw_request(path, headers, body, close=True))


def sse_chunks(raw):
    """(headers, [chunk payloads]) of a raw chunked SSE response; asserts the framing."""
    status, hdrs, _, rest = split_response(raw)
    assert status == 200, raw[:300]
    assert rest == b"", "bytes after the final chunk"
    return hdrs, decode_chunks(raw.partition(b"\r\n\r\n")[2])[0]


def jpost(path, body, headers):
    st, hdrs, data = SERVER.request("POST", path, body, headers)
    return st, hdrs, json.loads(data)


def responses_events(raw):
    """[(event name, data object)] of a raw Responses stream; asserts the framing of every event."""
    out = []
    for c in sse_chunks(raw)[1]:
        text = c.decode()
        assert text.startswith("event: ") and text.endswith("\n\n") and text.count("\n") == 3, text[:200]
        name, data = sse_events(c)[0]
        out.append((name, json.loads(data)))
    return out


OA, AN, GE = openai_headers("sk-test"), anthropic_headers("sk-ant-test"), gemini_headers("g-test")
CA = os.path.join(HERE, "certs", "ca.pem")


def chat_body(stream=False):
    return json.dumps(openai_chat(stream=stream)).encode()


def scen(spec, **extra):
    return dict({"Authorization": "Bearer sk-test", "X-DP-Scenario": spec}, **extra)


def tls_port(srv):
    urls = json.loads(srv.request("GET", "/_control/status")[2])["urls"]
    return int(next(u for u in urls if u.startswith("https:")).rsplit(":", 1)[1])


def _sandbox_available():
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return False
    flags = ["--mount", "--net", "--fork"] + ([] if os.geteuid() == 0 else ["--user", "--map-root-user"])
    return subprocess.run(["unshare"] + flags + ["true"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def _have(module):
    """Whether an optional SDK is installed (loaded by name: the project itself imports none)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


ANTHROPIC_BODY = anthropic_messages()
GEMINI_BODY = dict(gemini_contents(), generationConfig={})
GEMINI_GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
GEMINI_STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"

SHIPPED = ("dpmock.py", "dpmockctl.py", "scenarios.py", "Makefile", "dpmocklib")  #: the README's required copy list


def vendored_copy(test, names=SHIPPED):
    """A temporary tests/mock-server/ holding those files; returns its path. Any daemon its Makefile
    started (its pid file) is killed at cleanup."""
    d = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, d, True)
    dest = os.path.join(d, "tests", "mock-server")
    os.makedirs(dest)
    for name in names:
        src = os.path.join(HERE, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name))
        else:
            shutil.copy(src, dest)
    test.addCleanup(kill_pidfile, os.path.join(dest, "dpmock.pid"))
    return dest


def make_env(env=None):
    """The environment for a make run: none of a calling make's flags (its -w would add "Entering
    directory" lines) nor variables the Makefile reads."""
    drop = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS", "URL", "HOST", "PORT", "PIDFILE", "LOGFILE",
            "ENVFILE")
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in drop}


def pid_of(pidfile):
    with open(pidfile) as f:
        return int(f.read())


def lines_of(data):
    """Output lines, without make's own 'make: ...' lines."""
    return [line for line in data.decode().splitlines() if not line.startswith(("make:", "make["))]


class SharedServer:
    """The dpmock process most tests share (``-q``), started on first use and stopped by ``stop_shared``
    (the runner calls it; atexit does when a module runs alone), and by --parent-pid if this process dies."""

    def __init__(self):
        self._server = None

    def __getattr__(self, name):
        if self._server is None:
            self._server = Server("-q", "--parent-pid", str(os.getpid()))
            atexit.register(self.stop)
        return getattr(self._server, name)

    def stop(self):
        if self._server is not None:
            server, self._server = self._server, None
            return server.stop()


SERVER = SharedServer()
