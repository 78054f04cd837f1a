"""The pytest plugin: one dpmock server per session (per xdist worker) and a ``dpmock`` fixture per test.

Installed (``pip install dpmock``), pytest loads it through the ``pytest11`` entry point; from a vendored
copy, ``pytest -p dpmocklib.pytest_plugin`` with that copy's folder on sys.path (``PYTHONPATH=tests/mock-server``)
does. Only pytest imports this module, so pytest is never a dependency of dpmock.

- ``dpmock``: the test's own view of the server (a dpmocklib.api.Mock): ``dpmock.base_url("openai")`` and the
  rest point into a namespace named from the test's node id, so rules, schedule counters and the journal
  of one test never reach another, also under ``pytest -n 4``. Its rules and journal go when the test ends.
- ``dpmock_server``: the session's server (every test's namespace; global rules).
- ``@pytest.mark.dpmock_rules(rule, ...)``: rules the ``dpmock`` fixture adds before the test runs (a test's
  own markers first, then its class's and module's: the closest wins).
- A failed test that used ``dpmock`` gets a "dpmock journal" section in its report: the requests it sent.
- ``--dpmock-url URL`` uses a running server instead of starting one; ``--dpmock-arg=--seed=7`` (repeatable)
  or the ini option ``dpmock_args`` pass options to the session's server.
"""

import hashlib
import json
import os
import re

import pytest

_VIEW = "_dpmock_view"  #: the attribute of a test item that holds its dpmock fixture, for the report


def pytest_addoption(parser):
    group = parser.getgroup("dpmock", "dpmock (mock OpenAI, Gemini and Anthropic server)")
    group.addoption("--dpmock-url", default=None, metavar="URL",
                    help="use the dpmock server at URL (default: start one per session, or per xdist worker)")
    group.addoption("--dpmock-arg", action="append", default=[], metavar="OPTION",
                    help="a command-line option for the session's server, e.g. --dpmock-arg=--seed=7 (repeatable)")
    parser.addini("dpmock_args", type="args", default=[], help="command-line options for the session's dpmock server")


def pytest_configure(config):
    config.addinivalue_line("markers", "dpmock_rules(*rules): dpmock rules (dicts) for this test's namespace")


def test_id(nodeid, salt=""):
    """A dpmock test id (1-100 of letters, digits, '.', '_', '-') for a pytest node id: readable (its end, where
    the test's name is) and unique (a digest of the whole id, and of ``salt``: with --dpmock-url, a value of
    this session, so two runs sharing one server never share a namespace)."""
    digest = hashlib.sha1((salt + nodeid).encode("utf-8")).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", nodeid).strip("-")
    return (name[-(100 - 11):].lstrip("-") + "-" + digest).lstrip("-")


test_id.__test__ = False  # not a test, whatever its name


@pytest.fixture(scope="session")
def dpmock_server(request):
    """The session's dpmock server (started in a thread of this process, or --dpmock-url's)."""
    from dpmocklib.api import Mock, serve
    url = request.config.getoption("dpmock_url")
    if url:
        mock = Mock.attach(url)
        mock.salt = os.urandom(4).hex()  # another session may be using the same server: keep apart from it
        yield mock
        return
    args = list(request.config.getini("dpmock_args")) + list(request.config.getoption("dpmock_arg"))
    with serve(args=args) as mock:
        yield mock


@pytest.fixture
def dpmock(request, dpmock_server):
    """This test's view of the session's server: its own namespace, rules and journal."""
    mock = dpmock_server.for_test(test_id(request.node.nodeid, getattr(dpmock_server, "salt", "")))
    mock.clear_rules()  # a rerun, or a shared --dpmock-url server, starts clean
    mock.reset()
    for marker in request.node.iter_markers("dpmock_rules"):  # the closest first: a test's own rules win
        mock.add_rules(list(marker.args))
    setattr(request.node, _VIEW, mock)
    yield mock
    try:
        mock.clear_rules()
        mock.reset()
    finally:
        delattr(request.node, _VIEW)


def format_journal(entries, body_chars=300):
    """The journal as the report shows it: one line per request, and the start of its body."""
    if not entries:
        return "no requests reached dpmock in this test's namespace"
    lines = []
    for e in entries:
        why = ", ".join(x for x in ("route %s" % e["route"] if e.get("route") else "no route",
                                    ("rule %s" % e["rule"] if not e["rule"].startswith("miss:") else e["rule"])
                                    if e.get("rule") else "",
                                    "warning: %s" % e["warning"] if e.get("warning") else "",
                                    "scenario %s" % e["scenario"] if e.get("scenario") else "") if x)
        lines.append("#%s %s %s%s -> %s (%s)" % (e["seq"], e["method"], e["path"],
                                                   "?" + e["query"] if e.get("query") else "", e["status"], why))
        body = e.get("body")
        if body:
            try:
                body = json.dumps(json.loads(body), separators=(",", ":"))
            except ValueError:
                pass
            lines.append("    " + (body if len(body) <= body_chars else body[:body_chars] + "..."))
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    mock = getattr(item, _VIEW, None)
    if mock is None or not report.failed:
        return
    try:
        text = format_journal(mock.requests())
    except Exception as e:  # noqa: BLE001 - the report must come through whatever the server does
        text = "the journal could not be read: %s" % e
    report.sections.append(("dpmock journal (test %s)" % mock.test, text))
