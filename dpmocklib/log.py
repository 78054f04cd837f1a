"""Log: one line per request, levels, and the log file."""

import os
import threading
import time


class Log:
    """A thread-safe line logger writing to one stream (or nowhere).

    Access lines are queued and written by one flusher thread a moment later (a request
    never waits on a log write, nor on a lock); errors are written at once.
    """

    FLUSH_DELAY = 0.05  #: seconds a queued line may wait before it is written

    def __init__(self, stream, verbosity):
        self.stream, self.verbosity = stream, verbosity
        self.lock = threading.RLock()  #: re-entrant: a signal handler that logs may interrupt a holder
        self.queue = []  #: lines not yet written (list.append is atomic)
        self.kick = threading.Event()
        self.flusher = None
        self.closed = False
        self._stamp = (0, "")

    def enabled(self, level):
        return self.stream is not None and self.verbosity >= level

    def _line(self, fmt, args):
        now = int(time.time())
        if self._stamp[0] != now:
            self._stamp = (now, "%s dpmock[%d] " % (time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
                                                    os.getpid()))
        return self._stamp[1] + (fmt % args if args else fmt) + "\n"

    def _queue(self, line):
        if self.closed:
            with self.lock:
                return self._emit(line)
        self.queue.append(line)
        if not self.kick.is_set():
            if self.flusher is None:
                self._start_flusher()
            self.kick.set()

    def _start_flusher(self):
        with self.lock:
            if self.flusher is None:
                flusher = threading.Thread(target=self._flush_loop, name="dpmock-log", daemon=True)
                if self.flusher is None:  # not made meanwhile, by a signal handler that logged while this ran
                    self.flusher = flusher
                    flusher.start()

    def _flush_loop(self):
        while not self.closed:
            self.kick.wait()
            time.sleep(self.FLUSH_DELAY)
            self.kick.clear()
            self.flush()

    def close(self):
        """Write what is queued and end the flusher thread (for a log that outlives its server's process
        no longer: dpmock.serve); lines logged after this are written at once."""
        self.closed = True
        self.kick.set()
        if self.flusher is not None:
            self.flusher.join(1)
        self.flush()

    def flush(self):
        """Write every queued line now."""
        with self.lock:
            n = len(self.queue)
            lines = self.queue[:n]
            del self.queue[:n]  # lines queued meanwhile stay for the next flush
            if lines:
                self._emit("".join(lines))

    def _emit(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def error(self, fmt, *args):
        if self.enabled(0):
            line = self._line(fmt, args)
            self.flush()
            with self.lock:
                self._emit(line)

    def info(self, fmt, *args):
        if self.enabled(1):
            self._queue(self._line(fmt, args))

    def debug(self, fmt, *args):
        if self.enabled(2):
            self._queue(self._line(fmt, args))


def format_exc():
    """The current exception's traceback (the module loads only when something went wrong)."""
    import traceback
    return traceback.format_exc().rstrip()
