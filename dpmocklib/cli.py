"""Main: the command line's entry point, from arguments to a serving MockServer."""

import os
import socket
import sys

from . import __version__
from .base import StartError
from .config import UsageError, parse_args
from .daemon import (ENV_LISTEN_FD, ENV_PIDFILE_FD, ENV_RESTARTS, PidFile, daemonize, install_signals, open_log,
    redirect_stdio, reexec, watch, write_port_file)
from .faults import check_catalogue
from .log import Log
from .routes import ROUTES
from .rules import RuleBook
from .server import MockServer, bind_listener, tls_context


def start_server(config, socks, log, restarts=0, router=None):
    """A MockServer for ``config`` on the bound sockets ``socks`` (one per ``config.listens``), with its
    rules, TLS context and recorder: what the command line and the in-process API (api.serve) share.
    Raises StartError when a rules file, the certificate or the record folder will not do."""
    ctx = tls_context(config) if any(tls for tls, _, _ in config.listens) else None
    listeners = [(s, ctx if tls else None) for s, (tls, _, _) in zip(socks, config.listens)]
    rules = RuleBook(log, config.rules, config.strict)
    recorder = None
    if config.record:
        from .record import Recorder  # record and replay load only when recording
        recorder = Recorder(config, log, sys.stdout if config.announce else None)
    server = MockServer(config, listeners, log, restarts, rules, router)
    if recorder is not None:
        server.recorder, recorder.reload = recorder, server.reload_rules
        log.info("recording to %s from %s", config.record, " ".join(
            "%s=%s" % kv for kv in sorted(config.upstreams.items())))
    return server


def main(argv=None, router=None):
    """The command line (``argv``, by default sys.argv's); ``router``: a Router to serve in place of
    ROUTER (the route table plus a team's own routes, say). Returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_catalogue(ROUTES if router is None else router.routes)
    except StartError as e:
        print("dpmock: cannot start: %s" % e, file=sys.stderr)
        return 1
    if argv[:1] in (["sandbox"], ["_sandbox-inner"]):
        from .sandbox import sandbox_inner, sandbox_main  # the sandbox's code loads only for the sandbox
        return (sandbox_main if argv[0] == "sandbox" else sandbox_inner)(argv[1:])
    recording = argv[:1] == ["record"]
    if recording:  # record DIR [options]: --record DIR in the foreground, one line per recording on stdout
        argv = argv[1:]
        if argv[:1] and not argv[0].startswith("-"):
            argv = ["--record"] + argv
    try:
        config = parse_args(argv)
        if recording and not config.record:
            raise UsageError("dpmock.py record needs a folder: record DIR [options], or --record DIR")
    except UsageError as e:
        print("dpmock.py: error: %s (see --help)" % e, file=sys.stderr)
        return 2
    config.foreground = config.foreground or recording
    config.announce = recording
    inherited = os.environ.pop(ENV_LISTEN_FD, None)
    pid_fd = os.environ.pop(ENV_PIDFILE_FD, None)
    restarts = int(os.environ.pop(ENV_RESTARTS, "0") or 0)
    socks = []
    if inherited is not None:
        for fd in inherited.split(","):
            socks.append(socket.socket(fileno=int(fd)))
            socks[-1].set_inheritable(False)
    else:
        for tls, host, port in config.listens:
            try:
                socks.append(bind_listener(host, port))
            except OSError as e:
                print("dpmock: cannot listen on %s port %d%s: %s" % (host, port, " (TLS)" if tls else "",
                                                                    e.strerror or e), file=sys.stderr)
                return 1
    ready = None
    if inherited is None and not config.foreground:
        ready = daemonize()
    pidfile = None
    try:
        log = Log(open_log(config), config.verbosity)
        if config.pidfile:
            pidfile = PidFile(config.pidfile, int(pid_fd) if pid_fd else None)
            if pidfile.fd is None:
                pidfile.acquire()
            else:
                os.set_inheritable(pidfile.fd, False)
        server = start_server(config, socks, log, restarts, router)
        if config.port_file:
            write_port_file(config.port_file, socks[0].getsockname()[1])
    except StartError as e:
        if pidfile is not None:
            pidfile.release()
        if ready is not None:
            os.write(ready, ("error %s\n" % e).encode())
            os._exit(1)
        print("dpmock: %s" % e, file=sys.stderr)
        return 1
    install_signals(server)
    watch(server, config)
    if ready is not None:
        redirect_stdio()
        os.write(ready, ("ok %s\n" % server.url).encode())
        os.close(ready)
    elif inherited is None:
        print("DP_MOCK_SERVER=%s" % server.url, flush=True)
    log.info("serving %s (pid %d, dpmock %s%s)", " ".join(server.urls), os.getpid(), __version__,
             ", restart %d" % restarts if restarts else "")
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        left = server.drain()
        if left:
            log.error("stopping with %d connection(s) still open", left)
        log.flush()
    if server.restart_requested:
        reexec(server, pidfile)
    if pidfile is not None:
        pidfile.release()
    if config.port_file:
        try:
            os.unlink(config.port_file)
        except OSError:
            pass
    for s in socks:
        s.close()
    log.info("stopped")
    log.flush()
    return 0

