"""Regexes a user wrote (a rule's text_regex) run where they cannot stall the server.

Python's re holds the interpreter while it backtracks, so a pattern such as ``(a+)+$`` would freeze
every thread (SIGTERM's handler included). search() runs a pattern here only when it cannot
backtrack far on the text (a short text, and a pattern with at most two variable repeats, none
inside another or around an alternation, no backreference); any other search is sent to a helper
process (a plain ``python3 -I -S``, started on first use, one per concurrent search up to POOL),
which answers within its time limit or is killed and replaced: the search then raises RegexTimeout.
A helper reads its pipe and ends when the server does (the pipe closes, even on SIGKILL). Loaded
with the first rule that has a text_regex, or the first JSON Schema pattern checked."""

import marshal
import os
import re
import select
import subprocess
import sys
import threading
import time

from .base import cached

TIME_LIMIT = 0.25  #: seconds one search may take (the text's transfer included)
SHORT = 200  #: characters of text a pattern that cannot backtrack far is searched in here, not in a helper
POOL = 8  #: helper processes at most; a search waits up to WAIT for a free one (its time limit starts then)
WAIT = 2.0

#: The helper: reads (pattern, text) frames from stdin, answers (groups, groupdict) or None per frame.
_HELPER = r"""# dpmock regex helper
import marshal, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
inp, out, cache = sys.stdin.buffer, sys.stdout.buffer, {}
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    pattern, text = marshal.loads(inp.read(int.from_bytes(head, "big")))
    rx = cache.get(pattern)
    if rx is None:
        if len(cache) > 256:
            cache.clear()
        rx = cache[pattern] = re.compile(pattern)
    m = rx.search(text)
    data = marshal.dumps(None if m is None else (m.groups(), m.groupdict()))
    out.write(len(data).to_bytes(4, "big") + data)
    out.flush()
"""


class RegexTimeout(Exception):
    """A search that did not end within its time (the helper was killed)."""


class _Helper:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable or "python3", "-I", "-S", "-c", _HELPER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     bufsize=0, close_fds=True)
        self.out = self.proc.stdout.fileno()

    def search(self, pattern, text, deadline):
        data = marshal.dumps((pattern, text))
        data = memoryview(len(data).to_bytes(4, "big") + data)
        while data:
            data = data[os.write(self.proc.stdin.fileno(), data):]
        head = self._read(4, deadline)
        return marshal.loads(self._read(int.from_bytes(head, "big"), deadline))

    def _read(self, n, deadline):
        got = b""
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.out], [], [], left)[0]:
                raise RegexTimeout()
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
    """Searches run in helper processes, each bounded by TIME_LIMIT."""

    def __init__(self):
        self.idle, self.count = [], 0
        self.cond = threading.Condition()
        self.broken = None  #: why helpers cannot start (searches then run here, unguarded)

    def search(self, pattern, text, limit=TIME_LIMIT):
        """(groups, groupdict) of ``pattern`` searched in ``text``, None when it does not match;
        RegexTimeout when it took longer than ``limit`` seconds (or no helper was free within WAIT)."""
        for attempt in (1, 2):  # a helper that died (killed from outside) is replaced once
            helper = self._take(time.monotonic() + WAIT) if self.broken is None else None
            if helper is None:  # no helper can start: searched here, unguarded (said once on stderr)
                m = re.search(pattern, text)
                return None if m is None else (m.groups(), m.groupdict())
            try:
                found = helper.search(pattern, text, time.monotonic() + limit)
            except (RegexTimeout, OSError, ValueError, EOFError) as e:
                helper.close()
                with self.cond:
                    self.count -= 1
                    self.cond.notify()
                if isinstance(e, RegexTimeout) or attempt == 2:
                    raise RegexTimeout() from e
                continue
            with self.cond:
                self.idle.append(helper)
                self.cond.notify()
            return found

    def _take(self, deadline):
        with self.cond:
            while not self.idle and self.count >= POOL:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RegexTimeout()
                self.cond.wait(left)
            if self.idle:
                return self.idle.pop()
            self.count += 1
        try:
            return _Helper()
        except OSError as e:
            with self.cond:
                self.count -= 1
                self.broken = "cannot start the regex helper (%s): text_regex runs unguarded" % (e.strerror or e)
            try:
                sys.stderr.write("dpmock: %s\n" % self.broken)
            except (OSError, ValueError):
                pass
            return None

    def close(self):
        """Stop the idle helpers (before a re-exec; a busy one ends with its search)."""
        with self.cond:
            idle, self.idle = self.idle, []
            self.count -= len(idle)
        for helper in idle:
            helper.close()


def search(pattern, text, limit=TIME_LIMIT):
    """(groups, groupdict) of the first match of ``pattern`` in ``text``, None when there is none;
    RegexTimeout when the search took longer than ``limit`` seconds (in a helper, which was stopped)."""
    if len(text) <= SHORT and tame(pattern):
        m = re.search(pattern, text)
        return None if m is None else (m.groups(), m.groupdict())
    return pool().search(pattern, text, limit)


_TAME = {}


def tame(pattern):
    """Whether re cannot backtrack far on ``pattern`` in a SHORT text: it compiles, holds at most two
    repeats of variable count, none of them inside another repeat and no alternation inside a repeat,
    and no backreference or conditional (so at most about SHORT ** 3 steps)."""
    return cached(_TAME, pattern, _is_tame)


def _is_tame(pattern):
    try:
        return _tame(_parse(pattern), False, [0])
    except Exception:  # not a pattern re parses, or a parser this Python does not have
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


def _tame(items, in_repeat, variable):
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, inner = av
            repeats = hi != 1
            if lo != hi:
                variable[0] += 1
                if in_repeat or variable[0] > 2:
                    return False
            if not _tame(inner, in_repeat or repeats, variable):
                return False
        elif name == "BRANCH":
            if in_repeat or not all(_tame(b, in_repeat, variable) for b in av[1]):
                return False
        elif name == "SUBPATTERN":
            if not _tame(av[-1], in_repeat, variable):
                return False
        elif name in ("ASSERT", "ASSERT_NOT"):
            if not _tame(av[1], in_repeat, variable):
                return False
        elif name == "ATOMIC_GROUP":
            if not _tame(av, in_repeat, variable):
                return False
        elif name in ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE", "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE"):
            return False
    return True


_pool = None
_pool_lock = threading.Lock()


def pool():
    """The process's pool (helpers start on first search)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = RegexPool()
        return _pool
