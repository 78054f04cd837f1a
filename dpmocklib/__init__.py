"""dpmocklib: the code of dpmock, a standard-library-only mock of the OpenAI, Gemini and Anthropic APIs.

``python3 dpmock.py`` (beside this folder) and the ``dpmock`` console script run it; see README.md.
"""

import sys

__version__ = "0.1.0"  #: the one place the version is written (pyproject.toml reads it from here)


def __getattr__(name):
    """``dpmocklib.X`` is the package's name X (``dpmocklib.serve``, ``dpmocklib.ROUTES``): see names.py.
    Never a submodule's name (the import system asks for those before it imports them) nor a dunder."""
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    if name.startswith("__") or os.path.exists(os.path.join(here, name + ".py")) or os.path.isdir(
            os.path.join(here, name)):
        raise AttributeError("module 'dpmocklib' has no attribute %r" % name)
    import importlib
    return importlib.import_module("dpmocklib.names").find(name, "dpmocklib")

if sys.version_info < (3, 8):  # checked before anything 3.7 lacks: one line, not an AttributeError
    sys.stderr.write("dpmock needs Python 3.8 or newer (this is %d.%d)\n" % tuple(sys.version_info[:2]))
    raise SystemExit(2)
