"""Sandbox: the providers' real hosts, answered by dpmock, offline by construction."""

import fcntl
import os
import socket
import sys

from .base import CERTS, LAUNCHER, StartError
from .config import UsageError, parse_args


#: Vertex AI's locations and Bedrock's regions whose hosts the sandbox answers (the test certificate names each).
VERTEX_LOCATIONS = ("us-central1", "us-east1", "us-east4", "us-east5", "us-south1", "us-west1", "us-west4",
                    "northamerica-northeast1", "southamerica-east1", "europe-west1", "europe-west2", "europe-west3",
                    "europe-west4", "europe-west6", "europe-west8", "europe-west9", "europe-north1",
                    "europe-southwest1", "europe-central2", "asia-east1", "asia-northeast1", "asia-northeast3",
                    "asia-south1", "asia-southeast1", "australia-southeast1", "me-central1", "me-west1")
BEDROCK_REGIONS = ("us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1", "sa-east-1", "eu-central-1",
                   "eu-central-2", "eu-west-1", "eu-west-2", "eu-west-3", "eu-north-1", "eu-south-1", "eu-south-2",
                   "ap-northeast-1", "ap-northeast-2", "ap-northeast-3", "ap-south-1", "ap-south-2",
                   "ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "ap-southeast-4", "me-central-1",
                   "il-central-1", "us-gov-west-1", "us-gov-east-1")
AZURE_DOMAIN = "openai.azure.com"  #: every resource's host is under it (the certificate: *.openai.azure.com)
#: The hosts the sandbox answers (one Azure resource, dpmock.openai.azure.com; --sandbox-host adds others).
SANDBOX_HOSTS = (("api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com",
                  "aiplatform.googleapis.com") + tuple("%s-aiplatform.googleapis.com" % loc for loc in VERTEX_LOCATIONS)
                 + tuple("bedrock-runtime.%s.amazonaws.com" % r for r in BEDROCK_REGIONS) + ("dpmock." + AZURE_DOMAIN,))
#: Where distributions keep the system CA bundle (each one present is overlaid in the sandbox).
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/ca-bundle.pem",
              "/etc/ssl/cert.pem", "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem")
SANDBOX_LISTENS = ["--listen", "tls:443", "--listen", "80", "--listen", "8080"]
SANDBOX_UNAVAILABLE = 125  #: exit status when the sandbox itself cannot be made


def cert_config(which):
    """What ``make certs`` gives openssl: ``ext``, the server certificate's extensions (a name for each
    sandbox host, *.openai.azure.com for Azure's resources); ``ca``, the CA's name constraints (those names
    only, and loopback): one list, here, for the sandbox and its certificates."""
    names = [h for h in SANDBOX_HOSTS if not h.endswith("." + AZURE_DOMAIN)]
    if which == "ca":
        return ",".join(["permitted;DNS:%s" % h for h in names + [AZURE_DOMAIN, "localhost"]] +
                        ["permitted;IP:127.0.0.0/255.0.0.0",
                         "permitted;IP:::1/ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"])
    sans = ", ".join(["DNS:%s" % h for h in names + ["*." + AZURE_DOMAIN, "localhost"]] + ["IP:127.0.0.1", "IP:::1"])
    return ("# Extensions of dpmock's test server certificate (made by `make certs` from dpmocklib/sandbox.py).\n"
            "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth\nsubjectAltName = %s\nsubjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid\n" % sans)


def sandbox_hosts(options):
    """(dpmock's options, the hosts to answer): ``--sandbox-host NAME`` (repeatable) adds a host the test
    certificate names (an Azure resource: NAME.openai.azure.com); UsageError for any other."""
    import re
    rest, hosts, args = [], list(SANDBOX_HOSTS), list(options)
    while args:
        arg = args.pop(0)
        if arg == "--sandbox-host" or arg.startswith("--sandbox-host="):
            name = arg.partition("=")[2] if "=" in arg else (args.pop(0) if args else "")
            name = name.strip().lower().rstrip(".")
            if name not in hosts and not re.match(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.%s\Z"
                                                  % re.escape(AZURE_DOMAIN), name):
                raise UsageError("--sandbox-host %r: the sandbox answers hosts its test certificate names: "
                                 "RESOURCE.%s, or one of its Vertex AI and Bedrock regions' hosts"
                                 % (name[:60], AZURE_DOMAIN))
            hosts.append(name)
        else:
            rest.append(arg)
    return rest, list(dict.fromkeys(hosts))


def sandbox_main(argv):
    """``dpmock.py sandbox [dpmock options] -- CMD [ARGS...]``: CMD's exit status."""
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("dpmock.py sandbox: usage: python3 dpmock.py sandbox [dpmock options] -- CMD [ARGS...]",
              file=sys.stderr)
        return 2
    options = argv[:argv.index("--")]  # the command after "--" runs inside (sandbox_inner)
    try:
        options = sandbox_hosts(options)[0]
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
    (options, names), command = sandbox_hosts(argv[:cut]), argv[cut + 1:]
    try:
        loopback_up()
        hosts = "127.0.0.1 localhost %s\n::1 localhost ip6-localhost ip6-loopback\n%s" % (
            socket.gethostname(), "".join("127.0.0.1 %s\n" % name for name in names))
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
