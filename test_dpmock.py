#!/usr/bin/env python3
"""dpmock's tests: the one command that runs them all (``make test``), ending with one line
"N passed, N failed, N skipped".

The tests live in dpmocklib/tests/, one module per area, sharing dpmocklib/tests/support.py. They are
standard-library unittest, over real sockets, against real server processes; every server is
started on port 0 and stopped by the test that started it, even on failure.

Usage: python3 test_dpmock.py [-v | -q] [-f] [-k PATTERN]... [NAME...]
  NAME: a module (test_rules), a class (RulesTest) or a test (RulesTest.test_times): what to run.
  -k PATTERN: only tests whose id contains PATTERN (unittest's -k: fnmatch, substring by default).
"""

import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class _Result(unittest.TextTestResult):
    """Counts tests, not subtests: a test with any failing subtest is one failure."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failed_ids = set()

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self.failed_ids.add(test.id())

    def addError(self, test, err):
        super().addError(test, err)
        self.failed_ids.add(test.id())

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self.failed_ids.add(test.id())

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.failed_ids.add(test.id())


def _tests(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _tests(t)
        else:
            yield t


def select(suite, names):
    """The tests of ``suite`` that NAME a module, class or test (``RulesTest.test_times``); all without names."""
    if not names:
        return suite
    picked = []
    for t in _tests(suite):
        parts = t.id().split(".")  # dpmocklib.tests.test_rules.RulesTest.test_times
        tails = {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)}
        if any(n in tails for n in names):
            picked.append(t)
    return unittest.TestSuite(picked)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    verbosity, failfast, patterns, names = 2, False, [], []
    it = iter(argv)
    for arg in it:
        if arg == "-v":
            verbosity = 2
        elif arg == "-q":
            verbosity = 0
        elif arg == "-f":
            failfast = True
        elif arg == "-k":
            patterns.append(next(it, ""))
        elif arg.startswith("-k") and len(arg) > 2:
            patterns.append(arg[2:])
        elif arg in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        elif arg.startswith("-"):
            print("test_dpmock.py: error: unknown option %r (see --help)" % arg, file=sys.stderr)
            return 2
        else:
            names.append(arg)
    tests = os.path.join(HERE, "dpmocklib", "tests")
    if not os.path.isfile(os.path.join(tests, "support.py")):
        print("test_dpmock.py: %s is missing (dpmock's own tests: copy dpmocklib/tests/ too)" % tests, file=sys.stderr)
        return 1
    loader = unittest.TestLoader()
    if patterns:
        loader.testNamePatterns = ["*%s*" % p if "*" not in p else p for p in patterns]
    suite = select(loader.discover(tests, top_level_dir=HERE), names)
    if names and not suite.countTestCases():
        print("test_dpmock.py: error: no test is called %s" % " or ".join(names), file=sys.stderr)
        return 2
    from dpmocklib.tests.support import SERVER
    try:
        result = unittest.TextTestRunner(resultclass=_Result, verbosity=verbosity, failfast=failfast).run(suite)
    finally:
        SERVER.stop()
    failed = len(result.failed_ids)
    skipped = len(result.skipped)
    passed = max(0, result.testsRun - failed - skipped)
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed or not result.testsRun else 0


if __name__ == "__main__":
    sys.exit(main())
