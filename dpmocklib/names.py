"""Names: ``dpmock.X`` (and ``dpmocklib.X``) looked up in the package's modules, so no list is kept by hand."""

import importlib
import os
import pkgutil

#: Modules that are not part of the server's namespace: the build backend, the pytest plugin (it imports
#: pytest) and the tests.
_NOT_NAMES = ("_build", "pytest_plugin", "tests", "__main__")


def find(name, owner):
    """The object called ``name`` in the first package module that defines it, else AttributeError."""
    if name.startswith("__"):
        raise AttributeError("module %r has no attribute %r" % (owner, name))
    here = os.path.dirname(os.path.abspath(__file__))
    first = ("api", "cli", "server", "routes")  # the likeliest homes first: importing them loads nearly everything
    rest = sorted(m.name for m in pkgutil.iter_modules([here]) if m.name not in first and m.name not in _NOT_NAMES)
    for module in first + tuple(rest):
        if not os.path.exists(os.path.join(here, module + ".py")):
            continue
        mod = importlib.import_module("dpmocklib." + module)
        if name in vars(mod):
            return vars(mod)[name]
    raise AttributeError("module %r has no attribute %r" % (owner, name))


def layout_table():
    """The README's table of the package's modules: each file and the first line of its docstring.

    Read from the source (nothing is imported); the suite checks that the README holds this table.
    """
    import ast
    here = os.path.dirname(os.path.abspath(__file__))
    rows = ["| module | what it holds |", "|---|---|"]
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            rows.append("| `%s` | %s |" % (name, first.replace("|", "\\|")))
    rows.append("| `tests/` | dpmock's own tests, one module per area, and `support.py`, which they share |")
    return "\n".join(rows)
