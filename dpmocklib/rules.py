"""Rules: answers a team defines, matched before dpmock's own: the rule book (files, run-time rules,
per-test namespaces, the index a request is matched through) and step 7 of dispatch. One rule is rule.py."""

import itertools
import json
import os
import stat
import threading

from .base import HTTPError, StartError, read_regular_file
from .conversation import read_turn
from .providers import mask_key
from .state import mask_header


#: What a rule's ``match`` may say, and what its ``respond`` may give.
RULE_MATCH_KEYS = ("provider", "platform", "route", "model", "text", "text_exact", "text_regex", "system", "tool",
                   "tool_result", "turn", "stream", "key", "header", "query", "body")
RULE_RESPOND_KEYS = ("text", "tool_calls", "thinking", "json", "usage", "finish", "error", "scenario", "embedding",
                     "raw")
TEST_ID_MAX = 200  #: characters in a test id (pytest node ids with parameters fit)
MAX_FILE = 256 * 1024 * 1024  #: bytes in one rules file
HASH_EVERY = 10  #: every this many reloads (about 10 s), files are read and compared by content too


class RuleError(ValueError):
    """A rule that cannot be used; the message names the field."""


def check_test_id(name, where="test id"):
    """A test id is any printable text (a pytest node id: ``tests/test_a.py::test_b[openai-plain]``), up to
    TEST_ID_MAX characters, without control characters or spaces at its ends."""
    if not isinstance(name, str) or not 1 <= len(name) <= TEST_ID_MAX or not name.isprintable() \
            or name.strip() != name:
        raise RuleError("%s must be 1-%d printable characters, without control characters or spaces at its ends, "
                        "not %r" % (where, TEST_ID_MAX, str(name)[:60]))
    return name


class RuleBook:
    """Every rule in force: from --rules files (reloaded when they change) and added at run time.

    Matching looks only at the rules of the request's route and test (and the global ones);
    a rule with a ``text`` condition is found through a trigram of its text, so a request
    checks the few rules whose text could be in its prompt, not all of them.
    """

    def __init__(self, log, paths=(), strict=False):
        self.log, self.paths, self.strict = log, [os.path.normpath(p) for p in paths], strict
        self.lock = threading.Lock()
        self.file_rules = {}  # file path -> [Rule]
        self.runtime = []
        self.signatures = {}  # file path -> (size, inode, device, mtime, ctime, sha1 of the text) when last read
        self.reloads = 0
        self.broken = {}  #: file path -> why its last reload failed (it keeps its old rules meanwhile)
        self._order = itertools.count()
        self._ids = itertools.count(1)
        self.index = {}  # (test, route) -> ([rules without trigram], {trigram: [rules]})
        self.count = 0
        if self.paths:
            self.reload(initial=True)

    # ---------------------------------------------------------------- sources

    def files(self, initial=False):
        """The rules files: each --rules file, and the *.json entries of each --rules folder (a folder that
        cannot be listed is a problem of its own, logged once; its files keep their rules meanwhile)."""
        out = []
        for path in self.paths:
            if os.path.isdir(path):
                try:
                    names = os.listdir(path)
                except OSError as e:
                    why = "%s: cannot list the rules folder: %s" % (path, e.strerror)
                    if initial:
                        raise StartError(why)
                    self.problem(path, why)
                    out += [p for p in self.file_rules if os.path.dirname(p) == path]
                    continue
                if self.broken.pop(path, None) is not None:
                    self.log.info("rules: %s mended", path)
                out += sorted(os.path.join(path, n) for n in names if n.endswith(".json"))
            else:
                out.append(path)
        return out

    def reload(self, initial=False):
        """Re-read every rules file that changed (its size, inode, mtime or ctime; its content every
        HASH_EVERY reloads): a broken one keeps its old rules and logs one line naming it, once."""
        current = self.files(initial)
        self.reloads += 1
        rehash = self.reloads % HASH_EVERY == 0
        updates = {}
        for path in current:
            try:
                text = self.changed_text(path, rehash)
                if text is None:
                    continue
                rules = self.parse_file(path, text)
            except Exception as e:  # OSError, ValueError (not UTF-8, not JSON, a bad rule); a bug stops one file
                why = ("%s: cannot be read: %s" % (path, e.strerror or e) if isinstance(e, OSError) else
                       str(e) if isinstance(e, ValueError) else "%s: %s: %s" % (path, type(e).__name__, e))
                if initial:
                    raise StartError(why)
                if isinstance(e, OSError):  # not its text: the same text back is read, parsed and mended
                    self.signatures.pop(path, None)
                self.problem(path, why)
                continue
            updates[path] = rules
            if self.broken.pop(path, None) is not None:
                self.log.info("rules: %s mended", path)
            self.log.info("rules: %d from %s", len(rules), path)
        gone = [p for p in self.file_rules if p not in current]
        for path in gone:
            self.log.error("rules: %s is gone: its %d rules no longer apply", path, len(self.file_rules[path]))
        for path in set(self.signatures) - set(current):
            del self.signatures[path]
        for path in set(self.broken) - set(current) - set(self.paths):
            del self.broken[path]
        if updates or gone:
            with self.lock:
                files = dict(self.file_rules, **updates)
                for path in gone:
                    del files[path]
                self.swap(files, self.runtime)

    def changed_text(self, path, rehash):
        """A rules file's text when it changed since it was last read, else None. Only a regular file is
        opened (never a FIFO or a device, which could block), and only up to MAX_FILE bytes."""
        st = os.stat(path)  # OSError for a file removed, unreadable or in a symlink loop
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        sig = (st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)
        old_sig, old_digest = self.signatures.get(path, (None, None))
        if old_sig == sig and not rehash:
            return None
        self.signatures[path] = (sig, old_digest)  # a failed read is retried when the file changes again
        if st.st_size > MAX_FILE:
            raise ValueError("%s: %d bytes is over the %d byte limit of a rules file" % (path, st.st_size, MAX_FILE))
        data = read_regular_file(path, MAX_FILE)  # it may have become a FIFO since the stat: not opened then
        import hashlib
        digest = hashlib.sha1(data).digest()
        self.signatures[path] = (sig, digest)
        if digest == old_digest:
            return None  # touched, or rewritten the same: the same rules (or the same problem, said once)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError("%s: not UTF-8 text (byte %d)" % (path, e.start))

    def problem(self, path, why):
        """A rules file that cannot be (re)loaded: one log line, once per problem; listed by problems()."""
        if self.broken.get(path) != why:
            self.log.error("rules: %s", why)
        self.broken[path] = why

    def problems(self):
        """The rules files whose last reload failed: [{"file", "problem"}] (their old rules still apply)."""
        return [{"file": path, "problem": why} for path, why in sorted(self.broken.items())]

    def parse_file(self, path, text):
        """The rules of one file's text (all of them, or ValueError naming the file, the rule and the field)."""
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
        from .rule import Rule  # the rule compiler loads with the first rule
        rule = Rule(spec, next(self._order), test, source)
        if rule.id is None:
            rule.id = "rule-%d" % next(self._ids)
        return rule

    def add(self, specs, test=None):
        """Add rules at run time, all or none: every rule is checked before any is added; returns their ids."""
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
            self.swap(self.file_rules, self.runtime + rules)
        return [r.id for r in rules]

    def remove(self, rule_id, test=None):
        with self.lock:
            keep = [r for r in self.runtime if not (r.id == rule_id and r.test == test)]
            if len(keep) == len(self.runtime):
                source = next((r.source for r in self.all() if r.id == rule_id and r.test == test), None)
                if source:
                    raise RuleError("rule %r comes from %s: edit that file instead" % (rule_id, source))
                return False
            self.swap(self.file_rules, keep)
        return True

    def clear(self, test=None):
        with self.lock:
            before = len(self.runtime)
            self.swap(self.file_rules, [r for r in self.runtime if test is not None and r.test != test])
            return before - len(self.runtime)

    def reset_hits(self, test=None):
        for r in self.all():
            if test is None:
                r.hits.clear()
            else:
                r.hits.pop(test, None)

    def all(self):
        return [r for rules in self.file_rules.values() for r in rules] + self.runtime

    def swap(self, file_rules, runtime):
        """Put these rules in force (under self.lock): the index is built first, then everything is replaced at
        once, so a request sees the old rules or the new ones, never a mix. The index: per (test, route) and
        trigram, rules in priority order (higher first, then as defined)."""
        rules = sorted([r for rs in file_rules.values() for r in rs] + runtime, key=lambda r: (-r.priority, r.order))
        index = {}
        for r in rules:
            entry = index.setdefault((r.test, r.match.get("route")), ([], {}))
            if r.trigram is not None:
                entry[1].setdefault(r.trigram, []).append(r)
            else:
                entry[0].append(r)
        self.file_rules, self.runtime, self.index, self.count = file_rules, runtime, index, len(rules)

    # ---------------------------------------------------------------- matching

    def candidates(self, ctx, test):
        """The rules that could match: by priority, then a test's own before the global ones, then in the
        order they were defined."""
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
            found.sort(key=lambda r: (-r.priority, r.test is None, r.order))
        return found

    def match(self, ctx, test):
        """(rule, answer, groups) of the first rule that matches and may still fire, else None."""
        candidates = self.candidates(ctx, test)
        if ctx.text and any(r.regex is not None for r in candidates):
            from .rule import search_regexes
            search_regexes(candidates, ctx, only_if_rest_holds=True)
        for rule in candidates:
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
                found, named = ctx.found[rule]  # searched by its condition, just now
                groups = dict((str(i), g or "") for i, g in enumerate(found, 1))
                groups.update((k, v or "") for k, v in named.items())
            return rule, answers[min(n, len(answers) - 1)], groups
        return None

    def nearest(self, ctx, test, n=3):
        """The rules closest to matching, with the condition each failed (strict mode's diagnostic)."""
        with self.lock:  # a reload may be replacing a file's rules meanwhile
            rules = [r for r in self.all() if r.test in (None, test)]
        from .rule import json_pointer, search_regexes
        search_regexes(rules, ctx)
        scored = sorted(((len(r.misses(ctx)), -r.priority, r.test is None, r.order, r) for r in rules),
                        key=lambda x: x[:4])
        out = []
        for _, _, _, _, r in scored[:n]:
            miss = r.first_miss(ctx)
            if miss is None:
                out.append("rule %r (used up: times=%s)" % (r.id, r.times))
            else:
                name = miss[0]
                got = ({k: mask_header(k, ctx.headers.get(k) or "") for k in miss[1]} if name == "header" else
                       {k: json_pointer(ctx.body, k) for k in miss[1]} if name == "body" else
                       mask_key(ctx.key) if name == "key" else
                       {k: ctx.query.get(k, [None])[0] for k in miss[1]} if name == "query" else
                       getattr(ctx, {"text_regex": "text", "text_exact": "text"}.get(name, name.split()[0]), None))
                out.append("rule %r (%s %s, got %s)" % (r.id, name, _preview(miss[1]), _preview(got)))
        return out


def _preview(value):
    """A value's JSON, cut to 60 characters (a request's value may be too deep to write: then it says so)."""
    try:
        return json.dumps(value, default=lambda o: None)[:60]
    except (RecursionError, ValueError):
        return "(nested too deeply to show)"


def apply_rules(w, req):
    """Step 7 of dispatch: the answer of the rule that matches this request, or None."""
    book = w.server.rules
    strict = book.strict or (req.headers.get("x-dp-strict") or "").lower() in ("1", "true", "yes")
    if not book.count and not strict:
        return None
    from .rule import RuleContext, render  # loaded already: a rule exists, or strict mode's miss needs it
    ctx = RuleContext(req, read_turn(req))
    hit = book.match(ctx, req.test)
    if ctx.stalled:
        rid, why = ctx.stalled[0]
        req.warning = "text_regex of rule %r%s not searched in this request's %d-character text: %s; " \
            "counted as no match" % (rid, " (and %d more)" % (len(ctx.stalled) - 1) if len(ctx.stalled) > 1 else "",
                                     len(ctx.text), why)
        w.server.log.error("warning: %s", req.warning)
    if hit is None:
        if strict and req.route.reader is not None and w.server.recorder is None:  # recording: a miss is recorded
            near = book.nearest(ctx, req.test)
            req.rule = "miss: " + ("; ".join(near) if near else "no rules")
            raise HTTPError(400, "dpmock strict mode: no rule matched this request%s" % (
                "; nearest: " + "; ".join(near) if near else " (no rules are loaded)"), "no_rule_matched")
        if book.count and req.route.reader is not None and req.body_bytes <= 65536:  # bounded: the journal holds it
            ctx._trigrams = None  # the index's cache: not worth keeping (a long prompt's trigrams weigh MBs)
            req.miss = (book, ctx)
        return None
    rule, answer, groups = hit
    req.rule = rule.id
    req.source = "replayed" if "raw" in answer else "rule"
    if "raw" not in answer:  # a recorded answer is served byte for byte: no {{template}} in it is filled
        try:
            answer = render(answer, ctx, groups)
        except RuleError as e:
            raise HTTPError(400, "rule %r: %s" % (rule.id, e), "rule_template_invalid")
    err = answer.get("error")
    if err is not None:
        raise HTTPError(err["status"], err.get("message") or "error from rule %s" % rule.id, err.get("code"),
                        etype=err.get("type"))
    if answer.get("tool_calls") and req.turn is not None:
        problem = tool_call_problem(answer["tool_calls"], req.turn)
        if problem is not None:
            problem = "rule %r %s" % (rule.id, problem)
            if strict:
                with book.lock:  # refused, not served: the rule's times and script step are not used up
                    rule.hits[req.test] = max(0, rule.hits.get(req.test, 1) - 1)
                raise HTTPError(400, "dpmock strict mode: %s" % problem, "rule_tool_call_invalid")
            req.warning = problem if req.warning is None else req.warning + "; " + problem
            w.server.log.error("warning: %s", problem)
    return answer


def tool_call_problem(calls, turn):
    """What is wrong with a rule's tool calls for this request (a tool it did not offer, arguments that do not
    fit the tool's schema), or None. Requests that offer no tools are not checked (legacy clients)."""
    offered = dict(turn.tools)
    offered.update((name, None) for name in turn.typed_tools)  # their schemas are the provider's: not checked
    if not offered:
        return None
    for call in calls:
        name = call.get("name")
        if name not in offered:
            return "calls tool %r, which the request does not offer (it offers %s)" % (
                name, ", ".join(sorted(offered)))
        args = call.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return "calls tool %r with arguments that are not JSON: %r" % (name, args[:60])
        if isinstance(offered[name], dict) and offered[name]:
            from .schema import schema_error  # the schema engine loads with the first checked call
            where = schema_error(args if args is not None else {}, offered[name])
            if where is not None:
                return "calls tool %r with arguments that do not fit its schema: %s" % (name, where)
    return None
