"""Rules: answers a team defines, matched before dpmock's own."""

import itertools
import json
import os
import re
import threading

from .base import ANTHROPIC, GEMINI, HTTPError, OPENAI, StartError, scenarios
from .conversation import RULE_FINISH, read_turn
from .providers import first_of, mask_key, request_key
from .state import mask_header


#: What a rule's ``match`` may say, and what its ``respond`` may give.
RULE_MATCH_KEYS = ("provider", "route", "model", "text", "text_exact", "text_regex", "system", "tool", "tool_result",
                   "turn", "stream", "key", "header", "query", "body")
RULE_RESPOND_KEYS = ("text", "tool_calls", "thinking", "json", "usage", "finish", "error", "scenario", "embedding",
                     "raw")
_TEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class RuleError(ValueError):
    """A rule that cannot be used; the message names the field."""


def check_test_id(name, where="test id"):
    if not isinstance(name, str) or not 1 <= len(name) <= 100 or not _TEST_ID_CHARS.issuperset(name):
        raise RuleError("%s must be 1-100 letters, digits, '.', '_' or '-', not %r" % (where, str(name)[:40]))
    return name


class Rule:
    """One rule, compiled: its conditions as (name, predicate, wanted) triples over a RuleContext."""

    __slots__ = ("id", "priority", "times", "match", "respond", "test", "source", "order", "conds", "hits",
                 "trigram", "regex", "any_route", "recorded")

    def __init__(self, spec, order, test=None, source=None):
        if not isinstance(spec, dict):
            raise RuleError("a rule must be a JSON object with match and respond")
        unknown = set(spec) - {"id", "priority", "times", "match", "respond", "test", "recorded"}
        if unknown:
            raise RuleError("unknown rule field %r; a rule has id, priority, times, match, respond, recorded"
                            % sorted(unknown)[0])
        self.recorded = spec.get("recorded")  #: where a recorded rule came from (--record writes it)
        if self.recorded is not None and not (isinstance(self.recorded, dict) and all(
                isinstance(v, (str, int)) and not isinstance(v, bool) for v in self.recorded.values())):
            raise RuleError("recorded must be an object of strings and numbers (method, path, upstream, status)")
        self.id = spec.get("id")
        if self.id is not None and (not isinstance(self.id, str) or not self.id):
            raise RuleError("id must be a non-empty string")
        self.priority = _rule_int(spec, "priority", 0)
        self.times = _rule_int(spec, "times", None, low=1)
        self.test = check_test_id(spec["test"], "test") if spec.get("test") is not None else test
        self.source, self.order, self.hits = source, order, {}
        self.match = spec.get("match") or {}
        if not isinstance(self.match, dict):
            raise RuleError("match must be an object")
        self.respond = spec.get("respond")
        answers = self.respond if isinstance(self.respond, list) else [self.respond]
        if not answers:
            raise RuleError("respond must be an answer or a non-empty list of answers")
        for i, a in enumerate(answers):
            check_answer(a, "respond" if not isinstance(self.respond, list) else "respond[%d]" % i)
        self.regex = None
        self.trigram = None
        self.conds = [self._condition(k, v) for k, v in self.match.items()]
        #: it can answer a route without a conversation (models, files...): errors, scenarios, raw answers
        self.any_route = any("error" in a or "scenario" in a or "raw" in a for a in answers)

    def _condition(self, name, want):
        if name not in RULE_MATCH_KEYS:
            raise RuleError("unknown match field %r; known: %s" % (name, ", ".join(RULE_MATCH_KEYS)))
        if name in ("provider", "route", "system", "text", "text_exact", "tool", "key"):
            if not isinstance(want, str):
                raise RuleError("match.%s must be a string" % name)
            if name == "provider" and want not in (OPENAI, ANTHROPIC, GEMINI):
                raise RuleError("match.provider must be openai, anthropic or gemini")
            if name in ("text", "text_exact") and len(want) >= 3:
                self.trigram = want[len(want) // 2 - 1:len(want) // 2 + 2]
            if name == "text_exact":
                return name, (lambda c, w=want: c.text == w), want
        if name == "model":
            if not isinstance(want, str):
                raise RuleError("match.model must be a string (exact, or a glob with *)")
            if not any(ch in want for ch in "*?["):
                return name, (lambda c, w=want: c.model == w), want
            import fnmatch
            glob = re.compile(fnmatch.translate(want)).match  # compiled once, not at every request
            return name, (lambda c: glob(c.model) is not None), want
        if name == "text_regex":
            try:
                self.regex = re.compile(want)
            except (re.error, TypeError) as e:
                raise RuleError("match.text_regex is not a regular expression: %s" % e)
            return name, (lambda c: self.regex.search(c.text) is not None), want
        if name == "tool_result":
            if not isinstance(want, (bool, str)):
                raise RuleError("match.tool_result must be true, false or a tool name")
            return name, (lambda c, w=want: (c.tool_result is not None) == w if isinstance(w, bool)
                          else c.tool_result == w), want
        if name == "turn":
            if not isinstance(want, int) or isinstance(want, bool) or want < 0:
                raise RuleError("match.turn must be a whole number (the count of user messages)")
            return name, (lambda c, w=want: c.turn == w), want
        if name == "stream":
            if not isinstance(want, bool):
                raise RuleError("match.stream must be true or false")
            return name, (lambda c, w=want: c.stream == w), want
        if name == "query":
            if not isinstance(want, dict) or not want or not all(
                    isinstance(v, str) or v is None for v in want.values()):
                raise RuleError("match.query must be an object: parameter -> value (null: absent)")
            return name, (lambda c, w=want: all(c.query.get(k, [None])[0] == v for k, v in w.items())), want
        if name in ("header", "body"):
            if not isinstance(want, dict) or not want:
                raise RuleError("match.%s must be an object: %s" % (name, "name -> value" if name == "header" else
                                                                       "JSON pointer -> value"))
            if name == "body" and not all(k.startswith("/") or k == "" for k in want):
                raise RuleError("match.body keys must be JSON pointers such as /temperature")
            want = {k.lower(): v for k, v in want.items()} if name == "header" else want
            return name, (lambda c, w=want: c.header_has(w)) if name == "header" else \
                (lambda c, w=want: all(json_pointer(c.body, k) == v for k, v in w.items())), want
        if name in ("system", "text"):
            return name, (lambda c, n=name, w=want: w in getattr(c, n)), want
        if name == "tool":
            return name, (lambda c, w=want: w in c.tools), want
        return name, (lambda c, n=name, w=want: getattr(c, n) == w), want

    def first_miss(self, ctx):
        """The first condition ctx fails (name, wanted), else None."""
        for name, ok, want in self.conds:
            if not ok(ctx):
                return name, want
        return None

    def misses(self, ctx):
        return [(name, want) for name, ok, want in self.conds if not ok(ctx)]

    def public(self):
        out = {"id": self.id, "priority": self.priority, "times": self.times, "match": self.match,
               "respond": self.respond, "test": self.test, "source": self.source or "runtime",
               "hits": sum(self.hits.values())}
        if self.recorded is not None:
            out["recorded"] = self.recorded
        if self.hits:
            out["hits_by_test"] = {k or "": v for k, v in self.hits.items()}
        return out


def _rule_int(spec, name, default, low=None):
    value = spec.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        raise RuleError("%s must be a whole number%s" % (name, " of at least %d" % low if low is not None else ""))
    return value


def check_answer(a, where):
    """Refuse an answer a rule cannot give, naming the field."""
    if not isinstance(a, dict) or not a:
        raise RuleError("%s must be an object with text, tool_calls, json, error, scenario..." % where)
    unknown = set(a) - set(RULE_RESPOND_KEYS)
    if unknown:
        raise RuleError("unknown field %s.%s; an answer has %s" % (where, sorted(unknown)[0], ", ".join(RULE_RESPOND_KEYS)))
    if "text" in a and not isinstance(a["text"], str):
        raise RuleError("%s.text must be a string" % where)
    if "thinking" in a and not isinstance(a["thinking"], str):
        raise RuleError("%s.thinking must be a string" % where)
    calls = a.get("tool_calls", [])
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"]
                                              and isinstance(c.get("arguments", {}), dict) for c in calls):
        raise RuleError("%s.tool_calls must be a list of {name, arguments (an object)}" % where)
    if "finish" in a and (not isinstance(a["finish"], str) or a["finish"] not in RULE_FINISH):
        raise RuleError("%s.finish must be one of %s" % (where, ", ".join(RULE_FINISH)))
    usage = a.get("usage", {})
    if not isinstance(usage, dict) or not all(k in ("input_tokens", "output_tokens") and isinstance(v, int)
                                              and not isinstance(v, bool) and v >= 0 for k, v in usage.items()):
        raise RuleError("%s.usage must be {input_tokens, output_tokens} whole numbers" % where)
    err = a.get("error")
    if err is not None and not (isinstance(err, dict) and isinstance(err.get("status"), int)
                                and 400 <= err["status"] <= 599 and isinstance(err.get("message", ""), str)
                                and isinstance(err.get("type", ""), str)):
        raise RuleError("%s.error must be {status (400-599), message, type}" % where)
    if "scenario" in a:
        if not isinstance(a["scenario"], str):
            raise RuleError("%s.scenario must be scenario text such as 'STREAM_SLOW; tps=5'" % where)
        try:
            scenarios.resolve(a["scenario"])
        except KeyError as e:
            raise RuleError("%s.scenario names no scenario: %r" % (where, e.args[0]))
        except ValueError as e:
            raise RuleError("%s.scenario: %s" % (where, e))
    emb = a.get("embedding")
    if emb is not None and not (isinstance(emb, list) and emb and all(isinstance(x, (int, float)) and
                                                                      not isinstance(x, bool) for x in emb)):
        raise RuleError("%s.embedding must be a non-empty list of numbers" % where)
    if "raw" in a:
        if set(a) - {"raw", "scenario"}:
            raise RuleError("%s.raw is a whole answer: it goes alone (with a scenario at most), not with %s"
                            % (where, sorted(set(a) - {"raw", "scenario"})[0]))
        from .record import check_raw  # record and replay load only when a rule replays
        check_raw(a["raw"], where + ".raw")


def json_pointer(doc, pointer):
    """The value at an RFC 6901 JSON pointer, or a sentinel when there is none."""
    if pointer == "":
        return doc
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _NOTHING
    return doc


_NOTHING = object()


class RuleContext:
    """What a request asked, as rules see it (the same words on every provider)."""

    __slots__ = ("provider", "route", "model", "text", "system", "tools", "tool_result", "turn", "stream", "key",
                 "headers", "query", "body", "_trigrams", "conversation")

    def __init__(self, req, turn):
        self.provider, self.route = req.provider, req.route.name
        self.model = turn.model if turn is not None else req.params.get("model") or first_of(req.json, "model") or ""
        self.text = turn.user_text if turn is not None else ""
        self.system = turn.system if turn is not None else ""
        self.tools = [name for name, _ in turn.tools] if turn is not None else []
        self.tool_result = turn.tool_result[0] if turn is not None and turn.tool_result else None
        self.turn = turn.user_turns if turn is not None else 0
        self.stream = req.route.streaming(req)
        self.key = request_key(req) or ""
        self.headers, self.query, self.body = req.headers, req.query, req.json
        self._trigrams = None
        self.conversation = req.route.reader is not None  #: the route can use any answer

    def header_has(self, want):
        return all(self.headers.get(k) == v for k, v in want.items())

    def trigrams(self):
        if self._trigrams is None:
            t = self.text
            self._trigrams = {t[i:i + 3] for i in range(len(t) - 2)}
        return self._trigrams


class RuleBook:
    """Every rule in force: from --rules files (reloaded when they change) and added at run time.

    Matching looks only at the rules of the request's route and test (and the global ones);
    a rule with a ``text`` condition is found through a trigram of its text, so a request
    checks the few rules whose text could be in its prompt, not all of them.
    """

    def __init__(self, log, paths=(), strict=False):
        self.log, self.paths, self.strict = log, list(paths), strict
        self.lock = threading.Lock()
        self.file_rules = {}  # file path -> [Rule]
        self.runtime = []
        self.mtimes = {}
        self._order = itertools.count()
        self._ids = itertools.count(1)
        self.index = {}  # (test, route) -> ([rules without trigram], {trigram: [rules]})
        self.count = 0
        if self.paths:
            self.reload(initial=True)

    # ---------------------------------------------------------------- sources

    def files(self):
        out = []
        for path in self.paths:
            if os.path.isdir(path):
                out += sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json"))
            else:
                out.append(path)
        return out

    def reload(self, initial=False):
        """Re-read every rules file that changed; a broken one keeps its old rules and logs one line."""
        changed = False
        current = self.files()
        for path in current:
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError as e:
                if initial:
                    raise StartError("cannot read rules file %s: %s" % (path, e.strerror))
                continue
            if self.mtimes.get(path) == mtime:
                continue
            self.mtimes[path] = mtime
            try:
                rules = self.load_file(path)
            except (OSError, ValueError) as e:
                if initial:
                    raise StartError(str(e))
                self.log.error("rules: %s", e)
                continue
            with self.lock:
                self.file_rules[path] = rules
            changed = True
            self.log.info("rules: %d from %s", len(rules), path)
        for path in set(self.file_rules) - set(current):
            with self.lock:
                del self.file_rules[path]
            self.mtimes.pop(path, None)
            changed = True
        if changed:
            self.rebuild()

    def load_file(self, path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ValueError("%s: line %s: %s" % (path, getattr(e, "lineno", "?"), getattr(e, "msg", e)))
        except RecursionError:
            raise ValueError("%s: nested too deeply to be rules" % path)
        test = None
        if isinstance(doc, dict) and "rules" in doc:
            test = doc.get("test")
            doc = doc["rules"]
        specs = doc if isinstance(doc, list) else [doc]
        rules = []
        for i, spec in enumerate(specs):
            try:
                if test is not None:
                    check_test_id(test, "test")
                rules.append(self.make(spec, test, path))
            except RuleError as e:
                raise ValueError("%s: rule %d: %s" % (path, i + 1, e))
        return rules

    def make(self, spec, test, source):
        rule = Rule(spec, next(self._order), test, source)
        if rule.id is None:
            rule.id = "rule-%d" % next(self._ids)
        return rule

    def add(self, specs, test=None):
        """Add rules at run time (all or none); returns their ids."""
        specs = specs if isinstance(specs, list) else [specs]
        if not specs:
            raise RuleError("no rules given")
        rules = []
        for i, spec in enumerate(specs):
            try:
                rules.append(self.make(spec, test, None))
            except RuleError as e:
                raise RuleError("rule %d: %s" % (i + 1, e) if len(specs) > 1 else str(e))
        with self.lock:
            taken = {(r.test, r.id) for r in self.all()}
            for r in rules:
                if (r.test, r.id) in taken:
                    raise RuleError("a rule with id %r exists%s; DELETE /_control/rules/%s first" % (
                        r.id, " in test %s" % r.test if r.test else "", r.id))
                taken.add((r.test, r.id))
            self.runtime.extend(rules)
        self.rebuild()
        return [r.id for r in rules]

    def remove(self, rule_id, test=None):
        with self.lock:
            for r in self.runtime:
                if r.id == rule_id and r.test == test:
                    self.runtime.remove(r)
                    break
            else:
                source = next((r.source for r in self.all() if r.id == rule_id and r.test == test), None)
                if source:
                    raise RuleError("rule %r comes from %s: edit that file instead" % (rule_id, source))
                return False
        self.rebuild()
        return True

    def clear(self, test=None):
        with self.lock:
            before = len(self.runtime)
            self.runtime = [r for r in self.runtime if test is not None and r.test != test]
        self.rebuild()
        return before - len(self.runtime)

    def reset_hits(self, test=None):
        for r in self.all():
            if test is None:
                r.hits.clear()
            else:
                r.hits.pop(test, None)

    def all(self):
        return [r for rules in self.file_rules.values() for r in rules] + self.runtime

    def rebuild(self):
        """The index: per (test, route) and trigram, rules in priority order (higher first, then as defined)."""
        with self.lock:
            rules = sorted(self.all(), key=lambda r: (-r.priority, r.order))
            index = {}
            for r in rules:
                route = r.match.get("route")
                entry = index.setdefault((r.test, route), ([], {}))
                if r.trigram is not None:
                    entry[1].setdefault(r.trigram, []).append(r)
                else:
                    entry[0].append(r)
            self.index, self.count = index, len(rules)

    # ---------------------------------------------------------------- matching

    def candidates(self, ctx, test):
        """The rules that could match, in priority order."""
        found = []
        index = self.index
        for key in ((test, ctx.route), (test, None), (None, ctx.route), (None, None)) if test else \
                ((None, ctx.route), (None, None)):
            entry = index.get(key)
            if entry is None:
                continue
            found += entry[0]
            by_gram = entry[1]
            if by_gram:
                grams = ctx.trigrams()
                if len(by_gram) < len(grams):
                    for gram, rules in by_gram.items():
                        if gram in grams:
                            found += rules
                else:
                    for gram in grams:
                        found += by_gram.get(gram, ())
        if len(found) > 1:
            found.sort(key=lambda r: (-r.priority, r.order))
        return found

    def match(self, ctx, test):
        """(rule, answer, groups) of the first rule that matches and may still fire, else None."""
        for rule in self.candidates(ctx, test):
            if (not ctx.conversation and not rule.any_route) or rule.first_miss(ctx) is not None:
                continue
            with self.lock:
                n = rule.hits.get(test, 0)
                if rule.times is not None and n >= rule.times:
                    continue
                rule.hits[test] = n + 1
            answers = rule.respond if isinstance(rule.respond, list) else [rule.respond]
            groups = {}
            if rule.regex is not None:
                m = rule.regex.search(ctx.text)
                groups = dict((str(i), g or "") for i, g in enumerate(m.groups(), 1))
                groups.update((k, v or "") for k, v in m.groupdict().items())
            return rule, answers[min(n, len(answers) - 1)], groups
        return None

    def nearest(self, ctx, test, n=3):
        """The rules closest to matching, with the condition each failed (strict mode's diagnostic)."""
        rules = [r for r in self.all() if r.test in (None, test)]
        scored = sorted(((len(r.misses(ctx)), r.priority * -1, r.order, r) for r in rules), key=lambda x: x[:3])
        out = []
        for _, _, _, r in scored[:n]:
            miss = r.first_miss(ctx)
            if miss is None:
                out.append("rule %r (used up: times=%s)" % (r.id, r.times))
            else:
                name = miss[0]
                got = ({k: mask_header(k, ctx.headers.get(k) or "") for k in miss[1]} if name == "header" else
                       {k: json_pointer(ctx.body, k) for k in miss[1]} if name == "body" else
                       mask_key(ctx.key) if name == "key" else
                       {k: ctx.query.get(k, [None])[0] for k in miss[1]} if name == "query" else
                       getattr(ctx, {"text_regex": "text", "text_exact": "text"}.get(name, name), None))
                out.append("rule %r (%s %s, got %s)" % (r.id, name, json.dumps(miss[1])[:60],
                                                        json.dumps(got, default=lambda o: None)[:60]))
        return out


def render(value, ctx, groups):
    """Fill {{text}}, {{model}}, {{1}} and named groups into the strings of an answer."""
    if isinstance(value, str):
        if "{{" not in value:
            return value
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: {"text": ctx.text, "model": ctx.model}.get(
            m.group(1), groups.get(m.group(1), m.group(0))), value)
    if isinstance(value, list):
        return [render(v, ctx, groups) for v in value]
    if isinstance(value, dict):
        return {k: render(v, ctx, groups) for k, v in value.items()}
    return value


def apply_rules(w, req):
    """Step 7 of dispatch: the answer of the rule that matches this request, or None."""
    book = w.server.rules
    strict = book.strict or (req.headers.get("x-dp-strict") or "").lower() in ("1", "true", "yes")
    if not book.count and not strict:
        return None
    ctx = RuleContext(req, read_turn(req))
    hit = book.match(ctx, req.test)
    if hit is None:
        if strict and req.route.reader is not None and w.server.recorder is None:  # recording: a miss is recorded
            near = book.nearest(ctx, req.test)
            req.rule = "miss: " + ("; ".join(near) if near else "no rules")
            raise HTTPError(400, "dpmock strict mode: no rule matched this request%s" % (
                "; nearest: " + "; ".join(near) if near else " (no rules are loaded)"), "no_rule_matched")
        return None
    rule, answer, groups = hit
    req.rule = rule.id
    req.source = "replayed" if "raw" in answer else "rule"
    if "raw" not in answer:  # a recorded answer is served byte for byte: no {{template}} in it is filled
        answer = render(answer, ctx, groups)
    err = answer.get("error")
    if err is not None:
        raise HTTPError(err["status"], err.get("message") or "error from rule %s" % rule.id, err.get("code"),
                        etype=err.get("type"))
    return answer
