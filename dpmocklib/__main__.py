"""``python3 -m dpmocklib``: the same command line as ``python3 dpmock.py`` and the ``dpmock`` script."""

import sys

from dpmocklib.boot import run

if __name__ == "__main__":
    sys.exit(run())
