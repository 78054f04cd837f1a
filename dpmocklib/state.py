"""State: the journal, schedule counters, files and stored responses, shared by every connection."""

import threading
import time

from .base import b64, scenarios
from .faults import SCHEDULES
from .providers import find_key, mask_key, rfc3339
from .request import Headers
from .routing import parse_query, percent_decode


class JournalEntry:
    """One request as the journal keeps it, raw: formatting waits until someone reads it."""

    __slots__ = ("seq", "time", "client", "method", "path", "query", "headers", "body", "body_bytes", "route",
                 "scenario", "status", "bytes_sent", "duration_ms", "reused", "ended", "test", "rule", "source",
                 "miss", "warning")

    def __init__(self, client, req, reused):
        self.seq = 0
        self.time = time.time()
        self.client = client
        self.method, self.path, self.query = req.method, req.path, req.query_string
        self.headers = tuple(req.headers.items)
        self.body, self.body_bytes = bytes(req.captured), req.body_bytes
        self.route, self.scenario = req.route, req.scenario
        self.status, self.bytes_sent, self.duration_ms = None, 0, 0.0
        self.reused = reused
        self.ended = "pending"  #: until the answer is over
        self.test = req.test
        self.rule = self.source = self.miss = self.warning = None


class _Waiter:
    """A long-poll on the journal: it sees each new entry once, and wakes when it has enough."""

    __slots__ = ("filters", "want", "found", "event")

    def __init__(self, filters, want):
        self.filters, self.want, self.found = filters, want, []
        self.event = threading.Event()

    def offer(self, entry):
        if entry_matches(entry, self.filters):
            self.found.append(entry)
            if len(self.found) >= self.want:
                self.event.set()


class Journal:
    """The last N requests (a ring), for tests to assert on what a client sent.

    Entries get their ``seq`` and join the ring under one lock, in order, so an answer's
    ``last_seq`` never names an entry that a later ``since`` query could miss. A long-poll
    scans the ring once, then is offered each new entry (O(1) per waiter per request) and
    sleeps on its own event in between: idle waiters cost nothing.
    """

    def __init__(self, size):
        import collections
        self.entries = collections.deque(maxlen=size)
        self.size = size
        self.lock = threading.Lock()
        self.seq = 0  #: the last sequence number given out
        self.waiters = []

    def add(self, entry):
        with self.lock:
            self.seq += 1
            entry.seq = self.seq
            if self.size:
                self.entries.append(entry)
            for waiter in self.waiters:
                waiter.offer(entry)
        return entry

    def complete(self, entry):
        """The answer is over: waiters whose filters only its end can satisfy (rule, scenario) see it now."""
        if self.waiters:
            with self.lock:
                for waiter in self.waiters:
                    if entry not in waiter.found:
                        waiter.offer(entry)

    def clear(self, test=None):
        """Forget every entry, or those of one test."""
        with self.lock:
            n = len(self.entries)
            if test is None:
                self.entries.clear()
                return n
            kept = [e for e in self.entries if e.test != test]
            self.entries.clear()
            self.entries.extend(kept)
        return n - len(kept)

    def wait(self, filters, since, want, timeout, stop_event):
        """(matching entries, last_seq, timed out?): at once, or once ``want`` match, or at the timeout or a stop."""
        with self.lock:
            found = [e for e in self.entries if e.seq > since and entry_matches(e, filters)]
            if len(found) >= want or timeout <= 0 or stop_event.is_set():
                return found, self.seq, len(found) < want
            waiter = _Waiter(filters, want - len(found))
            self.waiters.append(waiter)
        try:
            waiter.event.wait(timeout)
        finally:
            with self.lock:
                self.waiters.remove(waiter)
                last = self.seq
        found += waiter.found
        return found, last, len(found) < want

    def wake_all(self):
        """At a stop: every long-poll answers now (no lock: this may run in a signal handler)."""
        for waiter in list(self.waiters):
            waiter.event.set()


def entry_matches(e, filters):
    for name, value in filters.items():
        if name == "path" and value not in e.path:
            return False
        if name == "route" and (e.route.name if e.route else None) != value:
            return False
        if name == "scenario" and (e.scenario or "").split(";")[0].strip() != value:
            return False
        if name == "key" and entry_key(e) != value:
            return False
        if name == "test" and e.test != (value or None):  # test= (empty): the requests outside any test
            return False
        if name == "rule" and e.rule != value:
            return False
        if name == "source" and (e.source or "dpmock") != value:
            return False
    return True


SECRET_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "proxy-authorization", "cookie",
                  "x-amz-security-token")


def mask_header(name, value):
    if name.lower() not in SECRET_HEADERS:
        return value
    scheme, sep, token = value.partition(" ")
    return scheme + sep + mask_key(token) if sep and scheme.lower() in ("bearer", "basic") else mask_key(value)


def mask_query(query):
    """A query string with the value of ``key`` masked, however its name was spelled (``%6Bey``)."""
    out = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and percent_decode(name, True) == "key":
            pair = name + "=" + mask_key(percent_decode(value, True))
        out.append(pair)
    return "&".join(out)


def entry_key(e):
    """The unmasked API key of a journal entry (for the ``key`` filter)."""
    return find_key(Headers(e.headers), e.route, parse_query(e.query))


def public_entry(e):
    """A journal entry as JSON: keys masked, body as text (else base64)."""
    try:
        text, b64_text = e.body.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64_text = None, b64(e.body)
    client = "%s:%s" % e.client[:2] if isinstance(e.client, tuple) else str(e.client)
    return {"seq": e.seq, "time": rfc3339(e.time), "client": client, "method": e.method, "path": e.path,
            "query": mask_query(e.query), "headers": [[k, mask_header(k, v)] for k, v in e.headers], "body": text,
            "body_base64": b64_text, "body_bytes": e.body_bytes, "body_truncated": e.body_bytes > len(e.body),
            "route": e.route.name if e.route else None, "platform": e.route.platform if e.route else None,
            "scenario": e.scenario, "status": e.status,
            "bytes_sent": e.bytes_sent, "duration_ms": round(e.duration_ms, 3), "reused": e.reused,
            "ended": e.ended, "test": e.test,
            "rule": e.rule if e.rule is not None or e.miss is None else miss_reason(e),
            "source": e.source or "dpmock", "warning": e.warning}


def miss_reason(e):
    """Why no rule answered, worked out the first time the journal is read (a miss costs nothing when
    nobody asks), then kept: the nearest rules as the rule book held them at that first reading."""
    miss = e.miss
    if isinstance(miss, str):
        return miss
    book, ctx = miss
    near = book.nearest(ctx, e.test)
    e.miss = "miss: " + ("; ".join(near) if near else "no rules")
    return e.miss


class Schedules:
    """Per-key request counters for the schedule scenarios (SCHEDULES: FAIL_FIRST, FAIL_EVERY, ...)."""

    LIMIT = 10000  #: counters kept; the oldest go first

    def __init__(self, seed):
        self.seed = seed
        self.lock = threading.Lock()
        self.counters = {}  # (key, spec) -> {"count": n, "rng": Random or None}

    def step(self, key, spec, kind, params):
        """Count this request; return (scenario name to apply or None, seed used or None)."""
        with self.lock:
            c = self.counters.get((key, spec))
            if c is None:
                c = self.counters[(key, spec)] = {"count": 0, "rng": None}
                while len(self.counters) > self.LIMIT:
                    self.counters.pop(next(iter(self.counters)))
            i = c["count"]
            c["count"] += 1
            seed = None
            if "seed" in params:
                seed = params["seed"] if params["seed"] >= 0 else self.seed
                if c["rng"] is None:
                    import random  # off the start-up path
                    c["rng"] = random.Random(seed)
            verdict = SCHEDULES[kind](i, params, c["rng"])
        if isinstance(verdict, str):
            return verdict, seed
        return (params["fault"] if verdict else None), seed

    def listing(self, test=None):
        with self.lock:
            return [{"test": t or None, "key": mask_key(k) if k else "", "scenario": spec, "requests": c["count"]}
                    for ((t, k), spec), c in self.counters.items() if test is None or t == test]

    def reset(self, test=None):
        with self.lock:
            if test is None:
                self.counters.clear()
            else:
                for name in [n for n in self.counters if n[0][0] == test]:
                    del self.counters[name]


class ThreadStore:
    """Conversations the server holds for Anthropic's threads (``thread: create / continue``), bounded."""

    LIMIT = 1000

    def __init__(self):
        self.lock = threading.Lock()
        self.messages = {}  # message id -> (the conversation up to and including that answer, its size)
        self.size = 0

    BYTES = 64 * scenarios.MIB  #: request bodies held in all, at most (each thread holds its body's messages)

    def put(self, message_id, messages, size):
        with self.lock:
            self.messages[message_id] = (messages, size)
            self.size += size
            while len(self.messages) > self.LIMIT or (self.size > self.BYTES and len(self.messages) > 1):
                self.size -= self.messages.pop(next(iter(self.messages)))[1]

    def get(self, message_id):
        with self.lock:
            found = self.messages.get(message_id)
        return list(found[0]) if found is not None else None


class FileStore:
    """Uploaded files' metadata (never their bytes), bounded, shared by every connection."""

    LIMIT = 1000

    def __init__(self):
        self.lock = threading.Lock()
        self.files = {}  # (provider, id) -> record dict
        self.kept = 0  # bytes of the records' "content"
        self.held = 0  # bytes kept by open resumable uploads
        self.uploads = {}  # upload_id -> resumable session dict

    KEPT = 256 * 1024 * 1024  #: file bytes kept in all (batch files); the oldest files go first past it

    def add(self, provider, record):
        with self.lock:
            self.files[(provider, record["id"])] = record
            self.kept += len(record.get("content") or b"")
            while len(self.files) > self.LIMIT or (self.kept > self.KEPT and len(self.files) > 1):
                self.kept -= len(self.files.pop(next(iter(self.files))).get("content") or b"")
        return record

    def get(self, provider, file_id):
        with self.lock:
            return self.files.get((provider, file_id))

    def remove(self, provider, file_id):
        with self.lock:
            record = self.files.pop((provider, file_id), None)
            self.kept -= len((record or {}).get("content") or b"")
            return record

    def list(self, provider):
        with self.lock:
            return [r for (p, _), r in self.files.items() if p == provider]

    def start_upload(self, session):
        with self.lock:
            self.uploads[session["id"]] = session
            while len(self.uploads) > self.LIMIT:
                self.held -= len(self.uploads.pop(next(iter(self.uploads))).get("content") or b"")

    def upload(self, upload_id):
        with self.lock:
            return self.uploads.get(upload_id)

    HELD = 64 * 1024 * 1024  #: bytes open resumable uploads may keep (JSONL, for batches) in all

    def hold(self, n):
        """Count ``n`` more bytes kept by open uploads (negative: released); False when past HELD."""
        with self.lock:
            if n > 0 and self.held + n > self.HELD:
                return False
            self.held += n
            return True

    def end_upload(self, upload_id):
        with self.lock:
            session = self.uploads.pop(upload_id, None)
            self.held -= len((session or {}).get("content") or b"")


class StoredResponse:
    """One stored Responses API answer: the response, its input items, and the conversation so far."""

    __slots__ = ("response", "input", "context", "size")

    def __init__(self, response, items, context, size):
        self.response = response
        self.input = items  #: this request's input items, with their ids
        self.context = context  #: every item a response continuing this one sees first
        self.size = size  #: bytes it holds, counted with its ancestors' (its context shares their items)


class ResponseStore:
    """Responses API answers made with ``store`` (for previous_response_id, GET, input_items): the
    last LIMIT of them, holding at most BYTES, shared by every connection."""

    LIMIT = 1000
    BYTES = 64 * scenarios.MIB

    def __init__(self):
        self.lock = threading.Lock()
        self.records = {}  # response id -> StoredResponse, oldest first
        self.size = 0

    def add(self, record):
        with self.lock:
            old = self.records.pop(record.response["id"], None)  # the same id again (a replay): replaced
            if old is not None:
                self.size -= old.size
            self.records[record.response["id"]] = record
            self.size += record.size
            while len(self.records) > self.LIMIT or (self.size > self.BYTES and len(self.records) > 1):
                self.size -= self.records.pop(next(iter(self.records))).size

    def get(self, response_id):
        with self.lock:
            return self.records.get(response_id)

    def remove(self, response_id):
        with self.lock:
            record = self.records.pop(response_id, None)
            if record is not None:
                self.size -= record.size
            return record
