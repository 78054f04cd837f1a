"""Boot: run the command line, and say in one line why the code cannot load when it cannot.

Imports nothing of dpmock's until ``run`` is called, so that a broken ``scenarios.py`` (or any
module) is reported, not raised as a traceback.
"""

import os
import sys
import time


def cannot_start(exc):
    """The code cannot load (a broken scenarios.py, say): say why in one line, exit 1.

    After a restart (re-exec) nobody reads stderr, so the line goes to --logfile too, and what the
    old process left (the pid file, whose lock this process inherited, and the port file) is
    removed: the server is gone, and nothing claims it runs. The environment names are the
    daemon's ENV_LISTEN_FD and ENV_PIDFILE_FD.
    """
    if isinstance(exc, SyntaxError):
        where, what = (exc.filename, exc.lineno), exc.msg
    else:
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where, what = (tb.tb_frame.f_code.co_filename, tb.tb_lineno), str(exc)
    line = "cannot start: %s line %s: %s: %s" % (where[0], where[1], type(exc).__name__, what)
    argv = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    paths = {}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--logfile", "--pidfile", "--port-file"):
            paths[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    sys.stderr.write("dpmock: %s\n" % line)
    if paths.get("--logfile"):
        try:
            with open(paths["--logfile"], "a", encoding="utf-8") as f:
                f.write("%s dpmock[%d] %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), os.getpid(), line))
        except OSError:
            pass
    inherited = os.environ.get("DPMOCK_PIDFILE_FD")
    try:
        if inherited and paths.get("--pidfile"):
            held, named = os.fstat(int(inherited)), os.stat(paths["--pidfile"])
            if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
                os.unlink(paths["--pidfile"])
        if os.environ.get("DPMOCK_LISTEN_FD") and paths.get("--port-file"):
            os.unlink(paths["--port-file"])
    except (OSError, ValueError):
        pass
    raise SystemExit(1)


def run(argv=None):
    """dpmock's command line: ``main(argv)``'s exit status, or exit 1 in one line if the code cannot load."""
    try:
        from .cli import main
    except Exception as e:  # noqa: BLE001 - whatever stops the code loading stops the server
        cannot_start(e)
    return main(argv)
