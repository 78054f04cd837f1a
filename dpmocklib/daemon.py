"""Daemon and lifecycle: detaching, the pid file, signals, re-exec, the port file and the idle watch."""

import fcntl
import os
import signal
import sys
import threading
import time

from .base import LAUNCHER, StartError
from .log import format_exc


ENV_LISTEN_FD = "DPMOCK_LISTEN_FD"
ENV_PIDFILE_FD = "DPMOCK_PIDFILE_FD"
ENV_RESTARTS = "DPMOCK_RESTARTS"


class PidFile:
    """A pid file held with flock (kept across fork and exec, unlike lockf)."""

    def __init__(self, path, fd=None):
        self.path, self.fd = path, fd

    def acquire(self):
        """Lock first, then truncate: never clobber the pid of a live holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StartError("cannot open pid file %s: %s" % (self.path, e.strerror))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise StartError("pid file %s is locked by running process %s" % (self.path, held or "?"))
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.fd = fd

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def daemonize():
    """Detach (fork, setsid, fork); return the readiness pipe's write end in the daemon.

    The launching process never returns: it waits on the pipe, prints what the daemon
    reported, and exits 0 only if the daemon said it is serving.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        chunks = []
        while True:
            piece = os.read(r, 4096)
            if not piece:
                break
            chunks.append(piece)
        os.waitpid(pid, 0)
        msg = b"".join(chunks).decode("utf-8", "replace").strip()
        if msg.startswith("ok "):
            print("DP_MOCK_SERVER=%s" % msg[3:], flush=True)
            os._exit(0)
        print("dpmock: %s" % (msg[6:] if msg.startswith("error ") else "daemon exited before it was ready"),
              file=sys.stderr, flush=True)
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    for sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    return w


def redirect_stdio():
    """Point fds 0-2 at /dev/null so the daemon holds no terminal or pipe of its launcher."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def install_signals(server):
    def on_signal(signum, frame):
        server.request_stop("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: server.reload_rules.set())


def reexec(server, pidfile):
    """Replace this process with a fresh dpmock that inherits the listening sockets and pid file."""
    for sock, _ in server.listeners:
        sock.set_inheritable(True)
    env = dict(os.environ)
    env[ENV_LISTEN_FD] = ",".join(str(sock.fileno()) for sock, _ in server.listeners)
    env[ENV_RESTARTS] = str(server.restarts + 1)
    if pidfile is not None and pidfile.fd is not None:
        os.set_inheritable(pidfile.fd, True)
        env[ENV_PIDFILE_FD] = str(pidfile.fd)
    else:
        env.pop(ENV_PIDFILE_FD, None)
    helpers = sys.modules.get(__package__ + ".saferegex")
    if helpers is not None:
        helpers.pool().close()  # the new image could not reap them
    server.log.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(LAUNCHER[0], LAUNCHER + server.config.to_argv(), env)


def write_port_file(path, port):
    """Write the port atomically (a reader never sees a half-written file)."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, path)
    except OSError as e:
        raise StartError("cannot write port file %s: %s" % (path, e.strerror))


def watch(server, config):
    """Start the watch threads this config asks for: the lifetime one (--idle-exit, --parent-pid) and the
    rules one, apart, so a slow rules folder can never delay the stop of a server whose parent is gone."""
    if config.idle_exit or config.parent_pid:
        threading.Thread(target=watch_lifetime, args=(server, config), name="dpmock-lifetime", daemon=True).start()
    if config.rules:
        threading.Thread(target=watch_rules, args=(server,), name="dpmock-rules", daemon=True).start()


def watch_lifetime(server, config):
    """Stop the server once it has been idle for --idle-exit seconds or --parent-pid has gone."""
    while not server.stop_event.wait(0.1):
        if config.parent_pid and not pid_alive(config.parent_pid):
            server.request_stop("parent process %d is gone" % config.parent_pid)
        elif config.idle_exit and server.active == 0 and \
                time.monotonic() - server.last_activity >= config.idle_exit:
            server.request_stop("no request for %g s" % config.idle_exit)


def watch_rules(server):
    """Re-read the rules files when one changed (checked every second) or on SIGHUP or a new recording."""
    while not server.stop_event.is_set():
        server.reload_rules.wait(1.0)
        if server.stop_event.is_set():
            break
        server.reload_rules.clear()
        try:
            server.rules.reload()
        except Exception:  # a bug must not end this thread
            server.log.error("rules: reload failed:\n%s", format_exc())


def pid_alive(pid):
    """Whether the process exists and is not a zombie (a daemon's exit is reaped by whoever adopted it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def open_log(config):
    if config.logfile:
        try:
            return open(config.logfile, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            raise StartError("cannot open log file %s: %s" % (config.logfile, e.strerror))
    return sys.stderr if config.foreground else None
