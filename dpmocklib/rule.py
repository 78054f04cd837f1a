"""One rule: its spec checked and compiled into conditions, what a request looks like to rules (RuleContext),
and the answer's templates filled in. Imported when the first rule is made (rules.py holds the rule book)."""

import json
import re
import time

from .base import ANTHROPIC, AZURE, BEDROCK, GEMINI, GEMINI_OPENAI, OPENAI, REGEX_BUDGET, VERTEX, bounded_int, cached, regex_left, scenarios, spend_regex
from .conversation import RULE_FINISH
from .providers import first_of, request_key
from .rules import RULE_MATCH_KEYS, RULE_RESPOND_KEYS, RuleError, check_test_id


MAX_DEPTH = 32  #: how deeply a rule's values may nest (match.body values, respond.json, tool call arguments)
MAX_REGEX = 4096  #: characters in a text_regex
MAX_INT = 10 ** 9  #: priority and times are within +-MAX_INT

#: The condition a text rule gets when it says nothing of tool results (strict mode's message names it so).
IMPLIED_NO_TOOL_RESULT = "tool_result (implied by a text condition; say tool_result: true or a name to match " \
    "tool-result turns)"


class Rule:
    """One rule, compiled: its conditions as (name, predicate, wanted) triples over a RuleContext."""

    __slots__ = ("id", "priority", "times", "match", "respond", "test", "source", "order", "conds", "hits",
                 "trigram", "regex", "any_route", "recorded")

    def __init__(self, spec, order, test=None, source=None):
        if not isinstance(spec, dict):
            raise RuleError("a rule must be a JSON object with match and respond")
        deep = depth_problem(spec)
        if deep is not None:
            raise RuleError("%s is nested more than %d levels deep" % (deep, MAX_DEPTH))
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
        self.priority = _rule_int(spec, "priority", 0, -MAX_INT)
        self.times = _rule_int(spec, "times", None, 1, nullable=True)
        self.test = check_test_id(spec["test"], "test") if spec.get("test") is not None else test
        self.source, self.order, self.hits = source, order, {}
        self.match = spec.get("match", {})
        if not isinstance(self.match, dict):
            raise RuleError("match must be an object of conditions (leave it out to match every request)")
        self.respond = spec.get("respond")
        answers = self.respond if isinstance(self.respond, list) else [self.respond]
        if not answers:
            raise RuleError("respond must be an answer or a non-empty list of answers")
        for i, a in enumerate(answers):
            check_answer(a, "respond" if not isinstance(self.respond, list) else "respond[%d]" % i)
        self.regex = None
        self.trigram = None
        self.conds = [self._condition(k, v) for k, v in self.match.items()]
        if "tool_result" not in self.match and not {"text", "text_exact", "text_regex"}.isdisjoint(self.match):
            # The user's words stay the last user text while the agent loop sends tool results: a rule on
            # them answers the user's own turns only, or its tool call would answer its own result forever.
            self.conds.append((IMPLIED_NO_TOOL_RESULT, lambda c: c.tool_result is None, False))
        # the regex search last: a rule that fails a cheaper condition never costs a search
        self.conds.sort(key=lambda cond: cond[0] == "text_regex")
        check_templates(self.respond, "respond", self.regex)
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
        if name == "platform":
            if want not in PLATFORMS:
                raise RuleError("match.platform must be %s, or \"\" (the providers' own APIs)"
                                % ", ".join(p for p in PLATFORMS if p))
            return name, (lambda c, w=want: c.platform == w), want
        if name == "model":
            if not isinstance(want, str):
                raise RuleError("match.model must be a string (exact, or a glob with *)")
            if not any(ch in want for ch in "*?["):
                return name, (lambda c, w=want: c.model == w), want
            glob = glob_matcher(want)  # compiled once, not at every request
            return name, (lambda c: glob(c.model)), want
        if name == "text_regex":
            if not isinstance(want, str) or len(want) > MAX_REGEX:
                raise RuleError("match.text_regex must be a regular expression of at most %d characters" % MAX_REGEX)
            try:
                self.regex = re.compile(want)
            except (re.error, RecursionError, OverflowError, ValueError) as e:
                raise RuleError("match.text_regex is not a regular expression: %s" % e)
            return name, (lambda c: self.search(c) is not None), want
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
            if name == "header":
                bad = next((k for k, v in want.items() if not k or not isinstance(v, str)), None)
                if bad is not None:
                    raise RuleError("match.header[%r] must be a header name with a string value" % bad[:40])
                want = {k.lower(): v for k, v in want.items()}
                return name, (lambda c, w=want: c.header_has(w)), want
            bad = next((k for k in want if not (k.startswith("/") or k == "") or _BAD_ESCAPE.search(k)), None)
            if bad is not None:
                raise RuleError("match.body key %r is not a JSON pointer (RFC 6901: /temperature, /messages/0/role; "
                                "~ is written ~0 and / in a name ~1)" % bad[:60])
            return name, (lambda c, w=want: all(json_equal(v, json_pointer(c.body, k)) for k, v in w.items())), want
        if name in ("system", "text"):
            return name, (lambda c, n=name, w=want: w in getattr(c, n)), want
        if name == "tool":
            return name, (lambda c, w=want: w in c.tools), want
        return name, (lambda c, n=name, w=want: getattr(c, n) == w), want

    def search(self, ctx):
        """The text_regex's (groups, groupdict) in the request's text, or None: searched once per request,
        where no pattern can stall the server (saferegex)."""
        found = ctx.found
        if self not in found:
            search_regexes([self], ctx)
        return found[self]

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


def search_regexes(rules, ctx, only_if_rest_holds=False):
    """Search the text_regex of each of these rules in the request's text, all in one round trip to the regex
    helper (saferegex), within the request's REGEX_BUDGET; results go to ctx.found (None: no match, or out of
    time: then the rule is in ctx.stalled with why). ``only_if_rest_holds``: only rules whose other conditions
    hold (the ones the search could decide)."""
    todo = [r for r in rules if r.regex is not None and r not in ctx.found and (not only_if_rest_holds or all(
        ok(ctx) for name, ok, _ in r.conds if name != "text_regex"))]
    if not todo:
        return
    from .saferegex import RegexTimeout, TIME_LIMIT, search_many
    results, why = [False] * len(todo), "the request's regex time (%g s) was used up" % REGEX_BUDGET
    left = regex_left()
    if left > 0:
        t = time.monotonic()
        try:
            results = search_many(ctx.text, [(r.regex.pattern, TIME_LIMIT) for r in todo], left)
            why = "it ran out of time (%g s)" % TIME_LIMIT
        except RegexTimeout as e:
            why = str(e)
        spend_regex(time.monotonic() - t)
    for r, result in zip(todo, results):
        ctx.found[r] = result or None
        if result is False:
            ctx.stalled.append((r.id, why))


def _rule_int(spec, name, default, low, nullable=False):
    value = spec.get(name, default)
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_INT:
        raise RuleError("%s must be a whole number from %d to %d%s" % (name, low, MAX_INT,
                                                                     " (or null: no limit)" if nullable else ""))
    return value


def depth_problem(spec):
    """The first of a rule's values that nests more than MAX_DEPTH levels (a match.body value, an answer's
    json or a tool call's arguments, each counted from itself), or of the rule as a whole more than that
    plus the levels around them; None when there is none."""
    match = spec.get("match")
    if isinstance(match, dict) and isinstance(match.get("body"), dict):
        for pointer, value in match["body"].items():
            if isinstance(value, (dict, list)) and _deep(value, MAX_DEPTH):
                return "match.body[%r]" % pointer[:40]
    respond = spec.get("respond")
    for i, answer in enumerate(respond if isinstance(respond, list) else [respond]):
        if not isinstance(answer, dict):
            continue
        where = "respond[%d]" % i if isinstance(respond, list) else "respond"
        if isinstance(answer.get("json"), (dict, list)) and _deep(answer["json"], MAX_DEPTH):
            return where + ".json"
        calls = answer.get("tool_calls")
        for j, call in enumerate(calls if isinstance(calls, list) else ()):
            args = call.get("arguments") if isinstance(call, dict) else None
            if isinstance(args, (dict, list)) and _deep(args, MAX_DEPTH):
                return "%s.tool_calls[%d].arguments" % (where, j)
    return too_deep(spec, MAX_DEPTH + 6)  # the rule, respond's list, an answer, tool_calls, a call: 5 more


def too_deep(value, limit):
    """Where ``value`` nests more than ``limit`` containers deep (a path such as respond.json.a...), else None."""
    if not _deep(value, limit):
        return None
    path = []
    while len(path) < 3:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        key, value = next((k, x) for k, x in items if isinstance(x, (dict, list)) and _deep(x, limit - len(path) - 1))
        path.append(str(key))
    return ".".join(path) + "..."


def _deep(value, left):
    """Whether ``value`` (a dict or list) holds containers more than ``left`` levels deep."""
    if left <= 0:
        return True
    for x in (value.values() if isinstance(value, dict) else value):
        if isinstance(x, (dict, list)) and _deep(x, left - 1):
            return True
    return False


_GLOBS = {}


def glob_matcher(pattern):
    """A model glob (``*``, ``?``, ``[...]``) as a test that never backtracks: the pieces between its stars are
    fixed-width regexes, found left to right (the first at the start, the last at the end), O(len x pieces)."""
    return cached(_GLOBS, pattern, _glob_matcher)


def _glob_matcher(pattern):
    import fnmatch
    pieces, piece, i = [], [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            pieces.append(piece)
            piece = []
        elif ch == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                piece.append(re.escape(ch))
            else:
                piece.append(fnmatch.translate(pattern[i:j + 1])[4:-3])  # '(?s:[...])\Z' -> '[...]'
                i = j
        else:
            piece.append("." if ch == "?" else re.escape(ch))
        i += 1
    pieces.append(piece)
    rxs = [(re.compile("(?s:%s)" % "".join(p)), len(p)) for p in pieces]
    first, last = rxs[0], rxs[-1]
    if len(rxs) == 1:
        return lambda s: isinstance(s, str) and first[0].fullmatch(s) is not None

    def test(s):
        if not isinstance(s, str) or len(s) < first[1] + last[1] or first[0].match(s) is None \
                or last[0].match(s, len(s) - last[1]) is None:
            return False
        pos, end = first[1], len(s) - last[1]
        for rx, width in rxs[1:-1]:
            m = rx.search(s, pos, end)
            if m is None:
                return False
            pos = m.end()
        return True
    return test


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


_BAD_ESCAPE = re.compile("~(?![01])")  #: RFC 6901: ~ only as ~0 (a ~) and ~1 (a /)


def json_pointer(doc, pointer):
    """The value at an RFC 6901 JSON pointer, or a sentinel when there is none. An array index is 0 or
    digits without a leading zero (so /a/01 is no element); "-" (past the end) never has a value."""
    if pointer == "":
        return doc
    for part in pointer[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict):
            if part not in doc:
                return _NOTHING
            doc = doc[part]
        elif isinstance(doc, list) and is_index(part) and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _NOTHING
    return doc


def is_index(part):
    """An RFC 6901 array index: 0, or ASCII digits with no leading zero (short enough for an int)."""
    return part == "0" or (0 < len(part) <= 18 and part[0] in "123456789" and part.isascii() and part.isdigit())


def json_equal(want, got):
    """JSON equality by JSON type: 1 is not true, 0 is not false, "1" is not 1 (1 and 1.0 are one number)."""
    if isinstance(want, bool) or isinstance(got, bool):
        return type(want) is type(got) and want == got
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and want == got
    if want is None or isinstance(want, str):
        return type(want) is type(got) and want == got
    if isinstance(want, list):
        return isinstance(got, list) and len(want) == len(got) and all(map(json_equal, want, got))
    if isinstance(want, dict):
        return isinstance(got, dict) and want.keys() == got.keys() and all(json_equal(v, got[k])
                                                                           for k, v in want.items())
    return False


_NOTHING = object()
PLATFORMS = (AZURE, BEDROCK, GEMINI_OPENAI, VERTEX, "")  #: match.platform: a route's platform, "" for none


class RuleContext:
    """What a request asked, as rules see it (the same words on every provider)."""

    __slots__ = ("provider", "platform", "route", "model", "text", "system", "tools", "tool_result", "tool_output", "tool_args",
                 "turn", "stream", "key", "headers", "query", "body", "_trigrams", "conversation", "found",
                 "stalled")

    def __init__(self, req, turn):
        self.provider, self.platform, self.route = req.provider, req.route.platform or "", req.route.name
        model = turn.model if turn is not None else req.params.get("model") or first_of(req.json, "model")
        self.model = model if isinstance(model, str) else ""
        self.text = turn.user_text if turn is not None else ""
        self.system = turn.system if turn is not None else ""
        self.tools = [name for name, _ in turn.tools] if turn is not None else []
        self.tool_result = turn.tool_result[0] if turn is not None and turn.tool_result else None
        self.tool_output = turn.tool_result[1] if turn is not None and turn.tool_result else None
        self.tool_args = turn.tool_args if turn is not None else None
        self.turn = turn.user_turns if turn is not None else 0
        self.stream = req.route.streaming(req)
        self.key = request_key(req) or ""
        self.headers, self.query, self.body = req.headers, req.query, req.json
        self._trigrams = None
        self.conversation = req.route.reader is not None  #: the route can use any answer
        self.found = {}  #: rule -> its text_regex's search result, for this request
        self.stalled = []  #: the rules whose text_regex ran out of time (no match, and a warning)

    def header_has(self, want):
        return all(self.headers.get(k) == v for k, v in want.items())

    def trigrams(self):
        if self._trigrams is None:
            t = self.text
            self._trigrams = {t[i:i + 3] for i in range(len(t) - 2)}
        return self._trigrams


#: ``{{name}}`` in an answer's strings; the names (and what they give) are TEMPLATE_NAMES, checked when a rule loads.
TEMPLATE = re.compile(r"\{\{\s*([\w-]+(?:\.[\w-]+)*)\s*\}\}")
TEMPLATE_NAMES = ("text", "model", "tool_name", "tool_result", "tool_result.KEY", "args.KEY")


#: ``{{{{`` in an answer is a literal ``{{`` (for text that shows templates of its own: Jinja, Mustache).
ESCAPE, _SENTINEL = "{{{{", "\x00dpmock-open\x00"


def check_templates(value, where, regex, top=True):
    """Refuse a template name nothing defines (``{{cty}}``), naming where it is and what is known."""
    if isinstance(value, str):
        for m in TEMPLATE.finditer(value.replace(ESCAPE, _SENTINEL)):
            name = m.group(1)
            head = name.split(".")[0]
            if name in ("text", "model", "tool_name", "tool_result") or (head in ("tool_result", "args")
                                                                          and "." in name):
                continue
            if regex is not None and (name in regex.groupindex or bounded_int(name, 1, regex.groups) is not None):
                continue
            groups = ["{{%d}}" % i for i in range(1, (regex.groups if regex is not None else 0) + 1)]
            groups += ["{{%s}}" % g for g in (regex.groupindex if regex is not None else ())]
            raise RuleError("%s: {{%s}} is not a template name; known: %s" % (
                where, name, ", ".join(["{{%s}}" % n for n in TEMPLATE_NAMES] + groups)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_templates(v, "%s[%d]" % (where, i), regex, top)
    elif isinstance(value, dict) and not (top and "raw" in value):  # a recorded answer is served byte for byte
        for k, v in value.items():
            check_templates(v, "%s.%s" % (where, k), regex, False)


def _lookup(value, path):
    """``path`` (dot-separated keys or list indexes) into a JSON value: JSON text is parsed first."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None
    for key in path:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and is_index(key) and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def _template_value(name, ctx, groups, typed=False):
    """A template's value as text (compact JSON for other values); ``typed``: as the JSON value itself."""
    if name in groups:
        return groups[name]
    head, _, rest = name.partition(".")
    if name in ("text", "model", "tool_name", "tool_result"):
        value = {"text": ctx.text, "model": ctx.model, "tool_name": ctx.tool_result,
                 "tool_result": ctx.tool_output}[name]
    elif head == "tool_result":
        value = _lookup(ctx.tool_output, rest.split("."))
    elif head == "args":
        value = _lookup(ctx.tool_args, rest.split("."))
    else:
        value = None
    if isinstance(value, (dict, list)) and _deep(value, MAX_DEPTH):
        raise RuleError("the request's {{%s}} is nested more than %d levels deep: too deep to fill in" % (
            name, MAX_DEPTH))
    if typed:
        return value
    if value is None:
        return ""  # the turn has no such thing (no tool result, no such key): nothing, not the braces
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def render(value, ctx, groups, typed=False):
    """Fill the templates (TEMPLATE_NAMES, and the text_regex's groups) into the strings of an answer.

    Inside tool call arguments and ``json`` values (``typed``), a string that is one template and nothing
    else becomes that value itself (``"{{tool_result.n}}"`` -> 2, not "2"; a missing one -> null)."""
    if isinstance(value, str):
        if "{{" not in value:
            return value
        if typed:
            m = TEMPLATE.fullmatch(value.strip())
            if m is not None and ESCAPE not in value:
                return _template_value(m.group(1), ctx, groups, typed=True)
        text = value.replace(ESCAPE, _SENTINEL)
        return TEMPLATE.sub(lambda m: _template_value(m.group(1), ctx, groups), text).replace(_SENTINEL, "{{")
    if isinstance(value, list):
        return [render(v, ctx, groups, typed) for v in value]
    if isinstance(value, dict):
        return {k: render(v, ctx, groups, typed or k in ("arguments", "json")) for k, v in value.items()}
    return value
