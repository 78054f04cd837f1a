"""Sandbox: the providers' real hosts, answered by dpmock, offline by construction."""

import fcntl
import os
import socket
import sys

from .base import CERTS, LAUNCHER, StartError
from .config import UsageError, parse_args


SANDBOX_HOSTS = ("api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com")
#: Where distributions keep the system CA bundle (each one present is overlaid in the sandbox).
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/ca-bundle.pem",
              "/etc/ssl/cert.pem", "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem")
SANDBOX_LISTENS = ["--listen", "tls:443", "--listen", "80", "--listen", "8080"]
SANDBOX_UNAVAILABLE = 125  #: exit status when the sandbox itself cannot be made


def sandbox_main(argv):
    """``dpmock.py sandbox [dpmock options] -- CMD [ARGS...]``: CMD's exit status."""
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("dpmock.py sandbox: usage: python3 dpmock.py sandbox [dpmock options] -- CMD [ARGS...]",
              file=sys.stderr)
        return 2
    options = argv[:argv.index("--")]  # the command after "--" runs inside (sandbox_inner)
    try:
        parse_args(options + SANDBOX_LISTENS)  # refuse bad options before making anything
    except UsageError as e:
        print("dpmock.py sandbox: error: %s" % e, file=sys.stderr)
        return 2
    import shutil
    unshare = shutil.which("unshare")
    if unshare is None:
        return sandbox_unavailable("the unshare command is not installed (util-linux)",
                                   "install util-linux, or run the command without the sandbox")
    flags = ["--mount", "--net", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        flags += ["--user", "--map-root-user"]
    import subprocess
    probe = subprocess.run([unshare] + flags + ["true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if probe.returncode != 0:
        why = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        return sandbox_unavailable("unshare %s failed: %s" % (" ".join(flags), why[-1] if why else "?"),
                                   "run as root, or allow unprivileged user namespaces "
                                   "(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces)")
    inner = subprocess.run([unshare] + flags + ["--"] + LAUNCHER + ["_sandbox-inner"] + argv)
    return inner.returncode if inner.returncode >= 0 else 128 - inner.returncode


def sandbox_unavailable(cause, hint):
    print("dpmock: sandbox unavailable: %s; %s" % (cause, hint), file=sys.stderr)
    return SANDBOX_UNAVAILABLE


def sandbox_inner(argv):
    """Inside the new namespaces (as root there): set the stage, serve, run the command."""
    cut = argv.index("--")
    options, command = argv[:cut], argv[cut + 1:]
    try:
        loopback_up()
        hosts = "127.0.0.1 localhost %s\n::1 localhost ip6-localhost ip6-loopback\n127.0.0.1 %s\n" % (
            socket.gethostname(), " ".join(SANDBOX_HOSTS))
        overlay(hosts.encode(), "/etc/hosts")
        with open(os.path.join(CERTS, "ca.pem"), "rb") as f:
            test_ca = f.read()
        bundles = [p for p in CA_BUNDLES if os.path.isfile(p)]
        for path in bundles:
            with open(path, "rb") as f:
                overlay(f.read().rstrip(b"\n") + b"\n" + test_ca, path)
    except (OSError, StartError) as e:
        return sandbox_unavailable(str(e), "the namespaces were made, but setting them up failed")
    import subprocess
    quiet = [] if any(o in options for o in ("-v", "--verbose", "-q", "--quiet", "--logfile")) else ["-q"]
    server = subprocess.Popen(LAUNCHER + ["--foreground"] + SANDBOX_LISTENS + quiet + options,
                              stdout=subprocess.PIPE)
    line = server.stdout.readline().decode().strip()
    if not line.startswith("DP_MOCK_SERVER="):
        server.wait()
        return sandbox_unavailable("dpmock did not start inside the sandbox", "see its error above")
    # DP_MOCK_SERVER names the --port listener when one was asked for (so --port 0 gives its real
    # port), else 8080 (the first plain listener dpmock reports is 80).
    asked = any(o == "--port" or o.startswith("--port=") for o in options)
    env = dict(os.environ, DP_MOCK_SERVER=line.split("=", 1)[1] if asked else "http://127.0.0.1:8080")
    bundle = bundles[0] if bundles else None
    if bundle:  # for clients that bring their own CA list (Python's certifi, requests, Node)
        env.update(SSL_CERT_FILE=bundle, REQUESTS_CA_BUNDLE=bundle, CURL_CA_BUNDLE=bundle)
    env["NODE_EXTRA_CA_CERTS"] = os.path.join(CERTS, "ca.pem")
    try:
        status = subprocess.call(command, env=env)
    except OSError as e:
        print("dpmock: cannot run %s: %s" % (command[0], e.strerror), file=sys.stderr)
        status = 127
    finally:
        server.terminate()
        server.wait()
    return status if status >= 0 else 128 - status


def loopback_up():
    """Bring the new network namespace's lo interface up (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    import struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 0x1))
    finally:
        s.close()


def overlay(content, target):
    """Lay ``content`` over the file ``target`` in this mount namespace only.

    The source is a temporary file, unlinked as soon as it is mounted: the mount keeps the file
    alive as long as the namespace, and outside the namespace nothing remains.
    """
    import ctypes
    import tempfile
    fd, path = tempfile.mkstemp(prefix="dpmock-sandbox-")
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, content)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(path.encode(), target.encode(), None, 4096, None) != 0:  # MS_BIND
            err = ctypes.get_errno()
            raise OSError(err, "cannot bind a file over %s: %s" % (target, os.strerror(err)))
    finally:
        os.close(fd)
        os.unlink(path)
