"""dpmocklib: the code of dpmock, a standard-library-only mock of the OpenAI, Gemini and Anthropic APIs.

``python3 dpmock.py`` (beside this folder) and the ``dpmock`` console script run it; see README.md.
"""

import sys

__version__ = "0.1.0"  #: the one place the version is written (pyproject.toml reads it from here)

if sys.version_info < (3, 8):  # checked before anything 3.7 lacks: one line, not an AttributeError
    sys.stderr.write("dpmock needs Python 3.8 or newer (this is %d.%d)\n" % tuple(sys.version_info[:2]))
    raise SystemExit(2)
