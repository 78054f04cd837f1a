"""The build backend (PEP 517 and PEP 660) that ``pip install .``, ``pipx``, ``uvx`` and ``python -m build`` use.

Standard library only, so building needs nothing from an index (``requires = []`` in pyproject.toml).
The metadata comes from pyproject.toml's ``[project]`` table and the version from ``dpmocklib.__version__``.
The wheel holds the package (without its tests or this backend), with ``scenarios.py`` and ``certs/`` from
beside it moved inside, and the ``dpmock.py`` launcher: nothing else lands at the top of site-packages.
"""

import base64
import hashlib
import io
import os
import re
import tarfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dpmocklib"
#: In the wheel: source path (relative to ROOT) -> path inside the wheel, beyond the package's own modules.
#: dpmock.py is the one other top-level name: ``import dpmock; dpmock.serve(...)`` as in a checkout.
EXTRA = {"scenarios.py": PACKAGE + "/scenarios.py", "dpmock.py": "dpmock.py"}
#: The files of certs/ that ship: the test CA's certificate and the server's pair, never the CA's key (make certs
#: leaves certs/ca.key and server.csr beside them; .gitignore keeps the key out of git, this out of packages).
CERT_FILES = ("README.md", "ca.pem", "server.ext", "server.key", "server.pem")
#: What the sdist carries beyond the package folder: enough to build the wheel and run the suite.
SDIST_FILES = ("pyproject.toml", "README.md", "Makefile", "dpmock.py", "dpmockctl.py", "scenarios.py",
               "test_dpmock.py", "bench_dpmock.py")
_SKIP_IN_WHEEL = ("tests", "_build.py", "__pycache__")


# ---------------------------------------------------------------- pyproject.toml (the subset it uses)

def parse_toml(text):
    """The TOML this project's pyproject.toml uses: tables, strings, string arrays, booleans, comments.

    tomllib arrives only with 3.11 and building must work on 3.8; the suite checks this against tomllib.
    """
    doc, table = {}, None
    table = doc
    lines = iter(text.splitlines())
    for raw in lines:
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if line.startswith("["):
            m = re.match(r"\[([A-Za-z0-9_.\-\"]+)\]$", line)
            if not m:
                raise ValueError("pyproject.toml: cannot read %r" % raw)
            table = doc
            for part in re.findall(r'"[^"]*"|[^.]+', m.group(1)):
                table = table.setdefault(part.strip('"'), {})
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise ValueError("pyproject.toml: cannot read %r" % raw)
        value = value.strip()
        while value.startswith("[") and not _closed(value):
            value += " " + _strip_comment(next(lines)).strip()
        table[key.strip().strip('"')] = _value(value, raw)
    return doc


def _strip_comment(line):
    out, quoted = [], False
    for c in line:
        if c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            break
        out.append(c)
    return "".join(out)


def _closed(value):
    return value.count("[") == value.count("]")


def _value(text, raw):
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        return text[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
    if text in ("true", "false"):
        return text == "true"
    if text.startswith("[") and text.endswith("]"):
        items = [t.strip() for t in re.findall(r'"(?:[^"\\]|\\.)*"', text[1:-1])]
        return [_value(t, raw) for t in items]
    raise ValueError("pyproject.toml: cannot read %r" % raw)


def project():
    """The ``[project]`` table, with its dynamic version filled in from dpmocklib/__init__.py."""
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        meta = dict(parse_toml(f.read())["project"])
    with open(os.path.join(ROOT, PACKAGE, "__init__.py"), encoding="utf-8") as f:
        meta["version"] = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    return meta


# ---------------------------------------------------------------- metadata

def _dist_name(meta):
    return re.sub(r"[-_.]+", "_", meta["name"]).lower()


def metadata(meta):
    lines = ["Metadata-Version: 2.1", "Name: " + meta["name"], "Version: " + meta["version"],
             "Summary: " + meta.get("description", ""), "Requires-Python: " + meta.get("requires-python", "")]
    lines += ["Classifier: " + c for c in meta.get("classifiers", [])]
    lines += ["Requires-Dist: " + d for d in meta.get("dependencies", [])]
    readme = meta.get("readme")
    if readme:
        lines.append("Description-Content-Type: text/markdown")
        with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
            return ("\n".join(lines) + "\n\n" + f.read()).encode("utf-8")
    return ("\n".join(lines) + "\n").encode("utf-8")


def entry_points(meta):
    groups = {"console_scripts": meta.get("scripts", {})}
    groups.update(meta.get("entry-points", {}))
    out = []
    for group, entries in groups.items():
        out.append("[%s]" % group)
        out += ["%s = %s" % kv for kv in sorted(entries.items())]
        out.append("")
    return "\n".join(out).encode("utf-8")


def _dist_info_files(meta):
    return {"METADATA": metadata(meta), "entry_points.txt": entry_points(meta),
            "top_level.txt": ("dpmock\n%s\n" % PACKAGE).encode(),
            "WHEEL": b"Wheel-Version: 1.0\nGenerator: dpmocklib._build\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}


# ---------------------------------------------------------------- wheels

def _epoch():
    return max(int(os.environ.get("SOURCE_DATE_EPOCH", "315532800")), 315532800)  # zip starts at 1980


def _write_wheel(directory, files, meta):
    """A wheel of ``files`` (path inside -> bytes) plus its dist-info; returns its file name."""
    name = "%s-%s-py3-none-any.whl" % (_dist_name(meta), meta["version"])
    info = "%s-%s.dist-info" % (_dist_name(meta), meta["version"])
    files = dict(files)
    files.update({info + "/" + k: v for k, v in _dist_info_files(meta).items()})
    record = []
    stamp = time.gmtime(_epoch())[:6]
    with zipfile.ZipFile(os.path.join(directory, name), "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(files):
            data = files[path]
            zi = zipfile.ZipInfo(path, stamp)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append("%s,sha256=%s,%d" % (path, digest, len(data)))
        record.append(info + "/RECORD,,")
        zi = zipfile.ZipInfo(info + "/RECORD", stamp)
        zi.external_attr = 0o644 << 16
        z.writestr(zi, "\n".join(record) + "\n")
    return name


def wheel_files():
    """What the wheel installs: path inside the wheel -> bytes."""
    files = {}
    pkg = os.path.join(ROOT, PACKAGE)
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py") and name not in _SKIP_IN_WHEEL:
            with open(os.path.join(pkg, name), "rb") as f:
                files[PACKAGE + "/" + name] = f.read()
    for src, dest in EXTRA.items():
        with open(os.path.join(ROOT, src), "rb") as f:
            files[dest] = f.read()
    for name in CERT_FILES:
        path = os.path.join(ROOT, "certs", name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[PACKAGE + "/certs/" + name] = f.read()
    return files


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _write_wheel(wheel_directory, wheel_files(), project())


_FINDER = '''"""Editable install of dpmocklib: ``import dpmocklib`` loads the package in the checkout at %(root)r."""
import importlib.util
import sys

_PATH = %(init)r
_DIR = %(pkg)r
_LAUNCHER = %(launcher)r


class _Finder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "dpmocklib":
            return importlib.util.spec_from_file_location(name, _PATH, submodule_search_locations=[_DIR])
        if name == "dpmock":
            return importlib.util.spec_from_file_location(name, _LAUNCHER)
        return None


def install():
    if _Finder not in sys.meta_path:
        sys.meta_path.append(_Finder)
'''


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """A wheel whose .pth maps only ``dpmocklib`` and ``dpmock`` to this checkout: scenarios.py and the rest stay
    unimportable."""
    init = os.path.join(ROOT, PACKAGE, "__init__.py")
    finder = "__editable___dpmocklib_finder"
    files = {finder + ".py": (_FINDER % {"root": ROOT, "init": init, "pkg": os.path.dirname(init),
                                         "launcher": os.path.join(ROOT, "dpmock.py")}).encode("utf-8"),
             "__editable__.dpmocklib.pth": ("import %s; %s.install()\n" % (finder, finder)).encode()}
    return _write_wheel(wheel_directory, files, project())


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


# ---------------------------------------------------------------- sdist

def sdist_files():
    """Path relative to ROOT of every file the sdist carries."""
    out = [p for p in SDIST_FILES if os.path.isfile(os.path.join(ROOT, p))]
    for d, dirs, names in os.walk(os.path.join(ROOT, PACKAGE)):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        out += [os.path.relpath(os.path.join(d, n), ROOT) for n in sorted(names) if not n.endswith(".pyc")]
    return out + [os.path.join("certs", n) for n in CERT_FILES if os.path.isfile(os.path.join(ROOT, "certs", n))]


def build_sdist(sdist_directory, config_settings=None):
    meta = project()
    base = "%s-%s" % (_dist_name(meta), meta["version"])
    name = base + ".tar.gz"
    pkg_info = metadata(meta)
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz", format=tarfile.PAX_FORMAT) as t:
        def add(path, data, mode=0o644):
            ti = tarfile.TarInfo(base + "/" + path)
            ti.size, ti.mtime, ti.mode = len(data), _epoch(), mode
            t.addfile(ti, io.BytesIO(data))
        for rel in sdist_files():
            full = os.path.join(ROOT, rel)
            with open(full, "rb") as f:
                add(rel.replace(os.sep, "/"), f.read(), 0o755 if os.access(full, os.X_OK) else 0o644)
        add("PKG-INFO", pkg_info)
    return name
