"""Regexes a user wrote (a rule's text_regex, a JSON Schema pattern) run where they cannot stall the server.

Python's re holds the interpreter while it backtracks, so a pattern such as ``(a+)+$`` would freeze
every thread (SIGTERM's handler included). search() runs a pattern here only when its cost on the
text is provably small (tame(): a short text, and a pattern whose choice points and fixed repeats
multiply to little); every other search goes to a helper process (a plain ``python3 -I -S``,
started on first use, up to POOL of them), where each search gets ``limit`` seconds of CPU time (an
interval timer interrupts re there) and counts as no match past it. A request's searches travel in
one round trip (search_many: the text is sent once). A helper that does not answer in time is
killed and replaced; one ends by itself when the server does (its pipe closes; a search in flight
first runs out of its CPU time). Loaded with the first rule that has a text_regex, or the first
JSON Schema pattern checked."""

import marshal
import os
import re
import select
import subprocess
import sys
import threading
import time

from .base import cached

TIME_LIMIT = 0.25  #: seconds of CPU time one search may take
SHORT = 256  #: characters of text, at most, that a tame pattern is searched in here, not in a helper
MAX_STEPS = 500000  #: a tame pattern's steps on the text, as tame() bounds them (a few ms of re's time at most)
POOL = 8  #: helper processes at most; a search waits up to WAIT for a free one
WAIT = 1.0
START = 10.0  #: seconds a new helper may take to say it is ready (a loaded machine starts Pythons slowly)
RETRY = 1.0  #: after a helper failed to start, searches fail at once for this long, then one tries again

#: The helper: says "R" when ready; then reads (text, [(pattern, seconds)], budget) frames and answers each
#: with a list: (groups, groupdict) for a match, None for none, False for a search out of its CPU time.
_HELPER = r"""# dpmock regex helper
import marshal, math, re, resource, signal, sys, time
class Late(Exception):
    pass
def late(signum, frame):
    raise Late()
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGVTALRM, late)
inp, out, cache = sys.stdin.buffer, sys.stdout.buffer, {}
hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
out.write(b"R")
out.flush()
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    text, jobs, budget = marshal.loads(inp.read(int.from_bytes(head, "big")))
    # The kernel's backstop: some of re's loops never look at signals; past this much CPU, SIGXCPU ends us.
    cap = math.ceil(time.process_time() + budget) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    results = []
    for pattern, limit in jobs:
        found, t0 = False, time.process_time()
        try:
            limit = min(limit, budget)
            if limit > 0:
                rx = cache.get(pattern)
                if rx is None:
                    if len(cache) > 256:
                        cache.clear()
                    rx = cache[pattern] = re.compile(pattern)
                signal.setitimer(signal.ITIMER_VIRTUAL, limit)
                try:
                    m = rx.search(text)
                finally:
                    signal.setitimer(signal.ITIMER_VIRTUAL, 0)
                found = None if m is None else (m.groups(), m.groupdict())
        except Exception:
            found = False
        try:
            budget -= time.process_time() - t0
            results.append(found)
        except Late:  # the timer fired just as the search ended
            budget -= time.process_time() - t0
            results.append(found)
    data = marshal.dumps(results)
    out.write(len(data).to_bytes(4, "big") + data)
    out.flush()
"""


class RegexTimeout(Exception):
    """A search that could not be done in time (or not at all: no helper could start); its text says why."""


class _Helper:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable or "python3", "-I", "-S", "-c", _HELPER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     bufsize=0, close_fds=True)
        self.out = self.proc.stdout.fileno()
        self.poll = select.poll()  # not select(): it refuses descriptors past 1023, which a busy server has
        self.poll.register(self.out, select.POLLIN)
        try:
            if self._read(1, time.monotonic() + START) != b"R":
                raise OSError("the regex helper said something else than ready")
        except BaseException:
            self.close()
            raise

    def alive(self):
        return self.proc.poll() is None

    def search(self, text, jobs, budget, deadline):
        data = marshal.dumps((text, jobs, budget))
        data = memoryview(len(data).to_bytes(4, "big") + data)
        fd = self.proc.stdin.fileno()
        while data:
            data = data[os.write(fd, data):]
        head = self._read(4, deadline)
        return marshal.loads(self._read(int.from_bytes(head, "big"), deadline))

    def _read(self, n, deadline):
        got = b""
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self.poll.poll(left * 1000):
                raise RegexTimeout("the regex helper did not answer in time")
            piece = os.read(self.out, n - len(got))
            if not piece:
                raise OSError("the regex helper ended")
            got += piece
        return got

    def close(self):
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class RegexPool:
    """Helper processes, each used by one search_many at a time."""

    def __init__(self):
        self.idle, self.count = [], 0
        self.cond = threading.Condition()
        self.failed = None  #: (monotonic time, why) of the last helper that could not start

    def search_many(self, text, jobs, budget, wait=WAIT):
        """For each (pattern, seconds) job, its search in ``text``: (groups, groupdict), None for no match,
        False past its seconds of CPU time; all of them together within ``budget`` seconds of CPU. RegexTimeout
        when no helper was free within ``wait`` or none could start."""
        wall = 2 + 4 * min(budget, sum(limit for _, limit in jobs)) + len(text) / 20e6  # a starved helper answers
        for attempt in (1, 2):  # a helper that died on its own (killed from outside) is replaced once
            helper = self._take(time.monotonic() + wait)
            try:
                results = helper.search(text, jobs, budget, time.monotonic() + wall)
            except BaseException as e:
                helper.close()
                self._gone()
                if not isinstance(e, (RegexTimeout, OSError, ValueError, EOFError)):
                    raise
                if isinstance(e, RegexTimeout) or attempt == 2:
                    raise RegexTimeout(str(e) or "the regex helper failed") from e
                continue
            with self.cond:
                self.idle.append(helper)
                self.cond.notify()
            return results

    def _take(self, deadline):
        with self.cond:
            while True:
                while self.idle:
                    helper = self.idle.pop()
                    if helper.alive():
                        return helper
                    self.count -= 1  # died while idle: reaped, not counted as an attempt
                    helper.close()
                if self.count < POOL:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RegexTimeout("all %d regex helpers were busy" % POOL)
                self.cond.wait(left)
            if self.failed is not None and time.monotonic() - self.failed[0] < RETRY:
                raise RegexTimeout(self.failed[1])
            self.count += 1
        try:
            return _Helper()
        except (OSError, RegexTimeout) as e:
            self._gone()
            why = "cannot start a regex helper: %s" % (getattr(e, "strerror", None) or e)
            with self.cond:
                self.failed = (time.monotonic(), why)
            raise RegexTimeout(why)

    def _gone(self):
        with self.cond:
            self.count -= 1
            self.cond.notify()

    def close(self):
        """Stop the idle helpers (before a re-exec; a busy one ends with its search)."""
        with self.cond:
            idle, self.idle = self.idle, []
            self.count -= len(idle)
        for helper in idle:
            helper.close()


def search(pattern, text, limit=TIME_LIMIT):
    """(groups, groupdict) of the first match of ``pattern`` in ``text``, None when there is none;
    RegexTimeout when it could not be searched within ``limit`` seconds of CPU time."""
    if not needs_helper(pattern, text):
        m = re.search(pattern, text)
        return None if m is None else (m.groups(), m.groupdict())
    found = pool().search_many(text, [(pattern, limit)], limit)[0]
    if found is False:
        raise RegexTimeout("it ran out of time")
    return found


def search_many(text, jobs, budget, wait=WAIT):
    """search() of several patterns in one text: the ones that need no helper here, the rest in one round trip."""
    out = [None] * len(jobs)
    remote = []
    for i, (pattern, limit) in enumerate(jobs):
        if needs_helper(pattern, text):
            remote.append(i)
        else:
            m = re.search(pattern, text)
            out[i] = None if m is None else (m.groups(), m.groupdict())
    if remote:
        for i, found in zip(remote, pool().search_many(text, [jobs[i] for i in remote], budget, wait)):
            out[i] = found
    return out


def needs_helper(pattern, text):
    n = len(text)
    if n > SHORT:
        return True
    return not tame(pattern, 16 if n <= 16 else 1 << (n - 1).bit_length())  # per power of two: few to cache


_TAME = {}


def tame(pattern, n=SHORT):
    """Whether re's search for ``pattern`` in a text of ``n`` characters is provably cheap: it parses; no
    backreference or conditional; no variable repeat inside another repeat, and no alternation inside one;
    and its steps are at most MAX_STEPS, bounded as n places to start, times its choices (each variable
    repeat: as many as its count can take, up to n; each alternation: its branches; multiplied), times its
    weight (its items, repeats multiplied out, one that eats text at most n times): every path re may try."""
    if len(pattern) > 1000:
        return False
    return cached(_TAME, (pattern, n), _is_tame)


def _is_tame(key):
    pattern, n = key
    try:
        cost = _Cost(n)
        weight = cost.walk(_parse(pattern), False)
        return n * cost.choices * weight <= MAX_STEPS
    except Exception:  # wild (raised by _Cost), not a pattern re parses, or a parser this Python lacks
        return False


def _parse(pattern):
    import warnings
    with warnings.catch_warnings():  # sre_parse is deprecated since 3.11, where re._parser has it
        warnings.simplefilter("ignore")
        try:
            from re import _parser as parser
        except ImportError:
            import sre_parse as parser
    return parser.parse(pattern)


class _Cost:
    """Walks a parsed pattern: returns its weight, counts its choices; ValueError when it is wild."""

    def __init__(self, n):
        self.n, self.choices = n, 1

    def choose(self, k):
        self.choices *= max(k, 1)
        if self.choices > MAX_STEPS:
            raise ValueError("too many choices")

    def walk(self, items, in_repeat):
        weight = 0
        for op, av in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, inner = av
                top = min(hi, self.n) if inner.getwidth()[0] >= 1 else hi  # what eats text stops at its end
                if lo != hi:
                    if in_repeat:
                        raise ValueError("a variable repeat inside a repeat")
                    self.choose(min(hi, self.n) - min(lo, self.n) + 1)
                body = self.walk(inner, in_repeat or hi > 1)
                weight += max(body, 1) * max(top, 1)
            elif name == "BRANCH":
                if in_repeat:
                    raise ValueError("an alternation inside a repeat")
                self.choose(len(av[1]))
                weight += sum(self.walk(b, in_repeat) for b in av[1])
            elif name == "SUBPATTERN":  # re saves and restores its marks when it backtracks: not free
                weight += self.walk(av[-1], in_repeat) + 1
            elif name == "IN":  # a class is checked item by item (characters past U+FFFF, categories)
                weight += len(av)
            elif name in ("ASSERT", "ASSERT_NOT"):
                weight += self.walk(av[1], in_repeat)
            elif name == "ATOMIC_GROUP":
                weight += self.walk(av, in_repeat)
            elif name.startswith("GROUPREF"):
                raise ValueError("a backreference")
            else:
                weight += 1
            if weight > MAX_STEPS:
                raise ValueError("too heavy")
        return weight


_pool = None
_pool_lock = threading.Lock()


def pool():
    """The process's pool (helpers start on first search)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = RegexPool()
        return _pool
