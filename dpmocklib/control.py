"""Control endpoints: /_control/... (status, journal, rules, schedules, reset, restart, shutdown)."""

import json
import os
import time

from . import __version__
from .base import HTTPError, clip, scenarios
from .providers import invalid
from .request import MAX_JSON_BODY
from .routing import int_arg
from .rules import RuleError, check_test_id
from .state import public_entry


def handle_control_status(w, req):
    srv = w.server
    w.send_json(200, {
        "status": "running",
        "version": __version__,
        "pid": os.getpid(),
        "foreground_mode": srv.config.foreground,
        "url": srv.url,
        "urls": srv.urls,
        "boot_id": srv.boot_id,
        "restarts": srv.restarts,
        "uptime_s": round(time.monotonic() - srv.started, 3),
        "requests": srv.request_count,
        "active_requests": srv.active,
        "scenarios": scenarios.names(),
        "seed": srv.config.seed,
        "journal": {"size": srv.config.journal_size, "held": len(srv.journal.entries), "last_seq": srv.journal.seq},
        "rules_broken": srv.rules.problems(),
        "endpoints": ["%s %s" % (r.method, r.pattern) for r in req.server.router.routes],
    })


def handle_control_requests(w, req):
    """The journal, filtered; with wait_for=N, held until N matching requests have arrived (or timeout)."""
    journal = w.server.journal
    filters = {name: req.arg(name) for name in ("path", "route", "scenario", "key", "test", "rule", "source")
               if req.arg(name) is not None}
    since = int_arg(req, "since", 0, 0, 2 ** 62)
    limit = int_arg(req, "limit", 100, 1, 10 ** 6)
    want = int_arg(req, "wait_for", 0, 0, 10 ** 6)
    timeout = _float_arg(req, "timeout", 10.0, 0.0, 60.0)
    found, last_seq, timed_out = journal.wait(filters, since, want, timeout, w.server.stop_event)
    w.send_json(200, {"requests": [public_entry(e) for e in found[-limit:]], "count": min(len(found), limit),
                      "matched": len(found), "last_seq": last_seq, "timed_out": timed_out})


def control_test(req):
    """The test a control request is about: ?test=NAME, else X-DP-Test-Id (None: every test). An empty one
    names no test and is refused: a harness whose test variable is unset must not act on its neighbours."""
    name = req.arg("test")
    if name == "":  # as the journal reads it, "outside any test": not "every test", which is no parameter
        raise invalid("test= (empty) names no test: leave it out for every test, or name one", "test")
    header = req.headers.get("x-dp-test-id")
    if name is None and req.test is None and header is not None and not header.strip():
        raise invalid("X-DP-Test-Id is empty: it names no test; leave it out for every test, or name one", "test")
    name = name or req.test
    try:
        return check_test_id(name) if name is not None else None
    except RuleError as e:
        raise invalid(str(e), "test")


def handle_control_requests_clear(w, req):
    w.send_json(200, {"cleared": w.server.journal.clear(control_test(req))})


def handle_control_schedules(w, req):
    w.send_json(200, {"counters": w.server.schedules.listing(control_test(req))})


def handle_control_reset(w, req):
    """Clear the journal, schedule counters and rule hit counts: of one test with ?test=NAME."""
    srv, test = w.server, control_test(req)
    counters = len(srv.schedules.listing(test))
    srv.schedules.reset(test)
    srv.rules.reset_hits(test)
    w.send_json(200, {"cleared_requests": srv.journal.clear(test), "cleared_counters": counters, "test": test})


def handle_control_rules_add(w, req):
    """POST /_control/rules: one rule or a list, for every test or (?test=NAME, X-DP-Test-Id) for one."""
    body = bytearray()
    for piece in req.body_pieces(MAX_JSON_BODY):
        body += piece
    try:
        specs = json.loads(bytes(body).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, "rules body is not valid JSON: %s" % e, "invalid_json")
    except RecursionError:
        raise HTTPError(400, "rules body is nested too deeply", "invalid_json")
    test = control_test(req)
    try:
        if isinstance(specs, dict) and "rules" in specs:  # a rules file's shape: {"test": NAME, "rules": [...]}
            if specs.get("test") is not None:
                test = check_test_id(specs["test"], "test")
            specs = specs["rules"]
        ids = w.server.rules.add(specs, test)
    except RuleError as e:
        raise invalid("bad rule: %s" % e, "rules", "bad_rule")
    w.send_json(200, {"ids": ids, "test": test})


def handle_control_rules_list(w, req):
    test = control_test(req)
    rules = [r.public() for r in w.server.rules.all() if test is None or r.test in (None, test)]
    w.send_json(200, {"rules": rules, "count": len(rules), "strict": w.server.rules.strict,
                      "broken": w.server.rules.problems()})


def handle_control_rules_clear(w, req):
    w.send_json(200, {"cleared": w.server.rules.clear(control_test(req))})


def handle_control_rule_delete(w, req):
    try:
        removed = w.server.rules.remove(req.params["rule_id"], control_test(req))
    except RuleError as e:
        raise HTTPError(409, str(e), "rule_from_file")
    if not removed:
        raise HTTPError(404, "no rule %r" % req.params["rule_id"], "not_found")
    w.send_json(200, {"deleted": req.params["rule_id"]})


def _float_arg(req, name, default, low, high):
    raw = req.arg(name)
    if raw is None:
        return default
    try:
        value = float(raw) if len(raw) <= 32 else None
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise invalid("%s: expected a number from %s to %s, got %r" % (name, low, high, clip(raw)), name)
    return value


def handle_control_shutdown(w, req):
    w.send_json(200, {"status": "shutting_down", "pid": os.getpid(),
                      "message": "dpmock stops once in-flight requests finish"}, close=True)
    w.server.request_stop("shutdown requested over HTTP")


def handle_control_restart(w, req):
    w.send_json(200, {"status": "restarting", "pid": os.getpid(), "boot_id": w.server.boot_id,
                      "message": "dpmock re-executes itself keeping its listening socket"}, close=True)
    w.server.request_stop("restart requested over HTTP", restart=True)
