"""Structured outputs: JSON Schema normalised, validated, and an instance generated for it.

Imported only when a request asks for structured output."""

import copy
import json
import math
import re

from .base import b64, count_arg, is_finite, regex_left, spend_regex
from .regexgen import MAX_STRING, regex_string


MAX_DEPTH = 16          # nesting depth from which only the cheapest valid value is generated
MAX_REF_REPEAT = 2      # a $ref may recur this often on one path before cheap mode
HARD_DEPTH = 48         # past this depth generation gives up (None)
MAX_ITEMS = 1000        # clamp for minItems / minProperties
MAX_PATTERN_CHECK = 100  # longer strings are never checked against a pattern
PATTERN_TIME = 0.1       # seconds of CPU one pattern check may take (saferegex); past it, it does not match
MAX_PATTERN = 10000      # characters in a pattern that is checked at all
BUDGET = 20000          # values generated per call before cheap mode (twice that: give up)
STEP_LIMIT = 200000     # schema resolutions + validation steps per call
UNION_TRIALS = 8        # anyOf / oneOf branches tried
UNIQUE_TRIES = 16       # attempts to find a distinct item under uniqueItems
_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
_ALIASES = (("min_items", "minItems"), ("max_items", "maxItems"), ("min_length", "minLength"),
            ("max_length", "maxLength"), ("min_properties", "minProperties"),
            ("max_properties", "maxProperties"), ("property_ordering", "propertyOrdering"),
            ("any_of", "anyOf"), ("one_of", "oneOf"), ("all_of", "allOf"),
            ("additional_properties", "additionalProperties"), ("prefix_items", "prefixItems"),
            ("pattern_properties", "patternProperties"), ("multiple_of", "multipleOf"),
            ("exclusive_minimum", "exclusiveMinimum"), ("exclusive_maximum", "exclusiveMaximum"),
            ("unique_items", "uniqueItems"), ("min_contains", "minContains"),
            ("max_contains", "maxContains"), ("$recursiveRef", "$ref"), ("$dynamicRef", "$ref"))
_FIRST_WINS = frozenset(("title", "description", "default", "examples", "example", "$schema", "$id",
                         "id", "$comment", "$defs", "definitions", "discriminator", "propertyOrdering",
                         "readOnly", "writeOnly", "deprecated", "$anchor", "$dynamicAnchor"))
_MAX_OF = frozenset(("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties", "minContains"))
_MIN_OF = frozenset(("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties", "maxContains"))
_SUBSCHEMA = frozenset(("items", "additionalProperties", "contains", "propertyNames",
                        "unevaluatedProperties", "unevaluatedItems"))
_OBJ_KEYS = ("properties", "required", "additionalProperties", "patternProperties", "minProperties",
             "maxProperties", "propertyOrdering", "propertyNames", "dependentRequired")
_ARR_KEYS = ("items", "prefixItems", "minItems", "maxItems", "contains", "uniqueItems")
_NUM_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_STR_KEYS = ("minLength", "maxLength", "pattern", "format")
_LAST_RESORT = ("Example123!",)


def schema_instance(schema, text="example"):
    """A JSON value valid against `schema`; the first string field carries `text` (module doc)."""
    if not isinstance(text, str):
        text = "example" if text is None else str(text)
    ctx = _Ctx(schema, text)
    try:
        return _gen(schema, ctx, 0, 0)
    except Exception:  # never raise: RecursionError on absurd inputs, anything unforeseen
        return text


def schema_error(value, schema):
    """None when ``value`` fits ``schema``, else where it does not, as ``/json/pointer: what``."""
    ctx = _Ctx(schema, "")
    try:
        return None if _ok(value, schema, ctx) else _where(value, schema, ctx, "", 0)
    except Exception:  # never raise: a schema too odd to explain is reported without the detail
        return "/: does not fit the schema"


def _where(value, schema, ctx, path, depth):
    """The deepest place under ``path`` where ``value`` fails ``schema`` (it is known to fail)."""
    here = path or "/"
    if schema is False or depth > 32:
        return "%s: nothing is allowed here" % here
    s = _canon(schema, ctx)
    ref = s.get("$ref")
    if isinstance(ref, str) and not _ok(value, _resolve(ref, ctx), ctx):
        return _where(value, _resolve(ref, ctx), ctx, path, depth + 1)
    types = s.get("type")
    if types and not any(_is_type(value, t) for t in types):
        return "%s: %s is not of type %s" % (here, json.dumps(value)[:40], " or ".join(types))
    enum = s.get("enum")
    if isinstance(enum, list) and not any(_jeq(value, e) for e in enum):
        return "%s: %s is not one of %s" % (here, json.dumps(value)[:40], json.dumps(enum)[:60])
    if isinstance(value, dict):
        for r in s.get("required") or ():
            if isinstance(r, str) and r not in value:
                return "%s: %r is required" % (here, r)
        props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
        for key, item in value.items():
            if key in props and not _ok(item, props[key], ctx):
                return _where(item, props[key], ctx, "%s/%s" % (path, key), depth + 1)
            if key not in props and s.get("additionalProperties") is False:
                return "%s/%s: no such property (additionalProperties is false)" % (path, key)
    if isinstance(value, list) and isinstance(s.get("items"), dict):
        for i, item in enumerate(value):
            if not _ok(item, s["items"], ctx):
                return _where(item, s["items"], ctx, "%s/%d" % (path, i), depth + 1)
    return "%s: %s does not fit the schema" % (here, json.dumps(value)[:40])


class _Ctx(object):
    """Per-call state: the root for $ref, the text slot, budgets and caches."""

    def __init__(self, root, text):
        self.root = root
        self.text = text
        self.text_used = False
        self.budget = BUDGET
        self.steps = 0
        self.refs = {}
        self.over = 0
        self.canon = {}
        self.index = None

def _num(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _canon(schema, ctx):
    """A canonical shallow copy: camelCase keys, lower-case type list, nullable folded in,
    draft-4 boolean exclusives made numeric, tuple `items` turned into `prefixItems`."""
    hit = ctx.canon.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    out = dict(schema)
    for old, new in _ALIASES:
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    types = out.pop("type", None)
    if isinstance(types, str):
        types = [types]
    if isinstance(types, (list, tuple)):
        types = [t.lower() for t in types if isinstance(t, str) and t.lower() in _TYPES]
        if types:
            out["type"] = list(dict.fromkeys(types))
    if out.pop("nullable", None) is True:
        if "type" in out and "null" not in out["type"]:
            out["type"] = out["type"] + ["null"]
        if isinstance(out.get("enum"), list) and not any(e is None for e in out["enum"]):
            out["enum"] = out["enum"] + [None]
    for flag_key, bound_key in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = out.get(flag_key)
        if isinstance(flag, bool):
            del out[flag_key]
            if flag and bound_key in out:
                out[flag_key] = out.pop(bound_key)
    if isinstance(out.get("items"), list):
        out.setdefault("prefixItems", out["items"])
        out["items"] = out.pop("additionalItems", True)
    ctx.canon[id(schema)] = (schema, out)
    return out


def _norm(schema, ctx, refs, chain=(), level=0):
    """`schema` with $ref and allOf merged in (None for the false schema); appends the $refs used."""
    if schema is False:
        return None
    if not isinstance(schema, dict):
        return {}
    ctx.steps += 1
    if level > 24 or ctx.steps > STEP_LIMIT:
        return {}
    out = dict(_canon(schema, ctx))
    ref = out.pop("$ref", None)
    if isinstance(ref, str):
        refs.append(ref)
        target = {} if ref in chain else _norm(_resolve(ref, ctx), ctx, refs, chain + (ref,), level + 1)
        if target is None:
            return None
        out = _merge(target, out, ctx)
    subs = out.pop("allOf", None)
    if isinstance(subs, list):
        for sub in subs:
            part = _norm(sub, ctx, refs, chain, level + 1)
            if part is None:
                return None
            out = _merge(out, part, ctx)
    return out


def _type_meet(a, b):
    out = []
    for t in a:
        if t in b:
            out.append(t)
        elif t in ("number", "integer") and ("number" in b or "integer" in b):
            out.append("integer")
    return list(dict.fromkeys(out)) or None


def _merge(a, b, ctx):
    """The conjunction of two canonical schemas; what cannot be merged stays in `allOf`."""
    out = dict(a)
    rest = {}
    for key, value in b.items():
        if key not in out:
            out[key] = value
            continue
        cur = out[key]
        if key == "type" and isinstance(cur, list) and isinstance(value, list):
            meet = _type_meet(cur, value)
            if meet is None:
                rest[key] = value
            else:
                out[key] = meet
        elif key == "required" and isinstance(cur, list) and isinstance(value, list):
            out[key] = list(cur) + [r for r in value if r not in cur]
        elif key in ("properties", "patternProperties") and isinstance(cur, dict) and isinstance(value, dict):
            merged = dict(cur)
            for name, sub in value.items():
                merged[name] = {"allOf": [merged[name], sub]} if name in merged else sub
            out[key] = merged
        elif key == "allOf" and isinstance(cur, list) and isinstance(value, list):
            out[key] = cur + value
        elif key in _MAX_OF and is_finite(cur) and is_finite(value):
            out[key] = max(cur, value)
        elif key in _MIN_OF and is_finite(cur) and is_finite(value):
            out[key] = min(cur, value)
        elif key == "enum" and isinstance(cur, list) and isinstance(value, list):
            out[key] = [x for x in cur if any(_jeq(x, y) for y in value)]
        elif key in _SUBSCHEMA and isinstance(cur, (dict, bool)) and isinstance(value, (dict, bool)):
            out[key] = {"allOf": [cur, value]}
        elif key == "uniqueItems":
            out[key] = cur is True or value is True
        elif key in _FIRST_WINS or _jeq(cur, value):
            pass
        else:
            rest[key] = value
    _close_properties(a, b, out)
    if rest:
        left = out.get("allOf")
        out["allOf"] = (list(left) if isinstance(left, list) else []) + [rest]
    return out


def _close_properties(a, b, out):
    """Merged properties that are additional for one side obey its additionalProperties:
    dropped where it is false, combined with it where it is a schema."""
    props = out.get("properties")
    if not isinstance(props, dict):
        return
    for side in (a, b):
        extra = side.get("additionalProperties")
        if extra is not False and not isinstance(extra, dict):
            continue
        own = side.get("properties") if isinstance(side.get("properties"), dict) else {}
        pats = side.get("patternProperties") if isinstance(side.get("patternProperties"), dict) else {}
        covered = lambda k: k in own or any(_search(p, k) for p in pats)
        if extra is False:
            props = {k: v for k, v in props.items() if covered(k)}
        else:
            props = {k: v if covered(k) else {"allOf": [v, extra]} for k, v in props.items()}
    out["properties"] = props


def _resolve(ref, ctx):
    """The local target of a $ref (None when it is not local or missing)."""
    pos = ref.find("#")
    base, frag = (ref, "") if pos < 0 else (ref[:pos], ref[pos + 1:])
    start = ctx.root
    if base:
        root_id = ctx.root.get("$id") if isinstance(ctx.root, dict) else None
        if not (isinstance(root_id, str) and (root_id == base or root_id.endswith("/" + base))):
            start = _index(ctx).get(base)
            if start is None:
                return None
    if "%" in frag:
        from urllib.parse import unquote
        frag = unquote(frag)
    if not frag:
        return start
    if not frag.startswith("/"):
        return _index(ctx).get("#" + frag)
    node = start
    for token in frag.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and token.isascii() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def _index(ctx):
    """$id and $anchor names of the root's subschemas (built once per call, bounded)."""
    if ctx.index is not None:
        return ctx.index
    index, stack, seen = {}, [ctx.root], 0
    while stack and seen < 20000:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            for key in ("$anchor", "$dynamicAnchor"):
                if isinstance(node.get(key), str):
                    index.setdefault("#" + node[key], node)
            sid = node.get("$id", node.get("id"))
            if isinstance(sid, str):
                index.setdefault(sid, node)
                index.setdefault(sid.rstrip("#"), node)
                if "/" in sid:
                    index.setdefault(sid.rsplit("/", 1)[1], node)
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    ctx.index = index
    return index

def _jeq(a, b):
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _num(a) and _num(b):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_jeq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_jeq(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _jkey(value):
    """A hashable key equal for JSON-equal values."""
    if isinstance(value, bool):
        return ("b", value)
    if _num(value):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if value is None:
        return ("z",)
    if isinstance(value, (list, tuple)):
        return ("l",) + tuple(_jkey(x) for x in value)
    if isinstance(value, dict):
        return ("d", frozenset((k, _jkey(x)) for k, x in value.items()))
    return ("o", repr(value))


def _is_type(value, kind):
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return _num(value) and (isinstance(value, int) or math.isfinite(value) and value.is_integer())
    if kind == "number":
        return _num(value)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "array":
        return isinstance(value, (list, tuple))
    if kind == "object":
        return isinstance(value, dict)
    return True


def _ok(value, schema, ctx, depth=0):
    """Whether `value` is valid against `schema` (True when it cannot tell within the budget)."""
    if schema is False:
        return False
    if not isinstance(schema, dict):
        return True
    ctx.steps += 1
    if depth > 64 or ctx.steps > STEP_LIMIT:
        return True
    s = _canon(schema, ctx)
    ref = s.get("$ref")
    if isinstance(ref, str) and not _ok(value, _resolve(ref, ctx), ctx, depth + 1):
        return False
    types = s.get("type")
    if types and not any(_is_type(value, t) for t in types):
        return False
    enum = s.get("enum")
    if isinstance(enum, list) and not any(_jeq(value, e) for e in enum):
        return False
    if "const" in s and not _jeq(value, s["const"]):
        return False
    if not _ok_logic(value, s, ctx, depth + 1):
        return False
    if isinstance(value, bool) or value is None:
        return True
    if _num(value):
        return _ok_number(value, s)
    if isinstance(value, str):
        return _ok_string(value, s)
    if isinstance(value, (list, tuple)):
        return _ok_array(value, s, ctx, depth + 1)
    if isinstance(value, dict):
        return _ok_object(value, s, ctx, depth + 1)
    return True


def _ok_logic(value, s, ctx, depth):
    subs = s.get("allOf")
    if isinstance(subs, list) and not all(_ok(value, x, ctx, depth) for x in subs):
        return False
    subs = s.get("anyOf")
    if isinstance(subs, list) and subs and not any(_ok(value, x, ctx, depth) for x in subs):
        return False
    subs = s.get("oneOf")
    if isinstance(subs, list) and subs and sum(1 for x in subs if _ok(value, x, ctx, depth)) != 1:
        return False
    if isinstance(s.get("not"), (dict, bool)) and _ok(value, s["not"], ctx, depth):
        return False
    if isinstance(s.get("if"), (dict, bool)):
        branch = s.get("then") if _ok(value, s["if"], ctx, depth) else s.get("else")
        if isinstance(branch, (dict, bool)) and not _ok(value, branch, ctx, depth):
            return False
    return True


def _bounds(s):
    """(low, low_exclusive, high, high_exclusive) from a canonical schema."""
    lo, lo_ex, hi, hi_ex = None, False, None, False
    for key, exclusive in (("minimum", False), ("exclusiveMinimum", True)):
        v = s.get(key)
        if is_finite(v) and (lo is None or v > lo or v == lo and exclusive):
            lo, lo_ex = v, exclusive
    for key, exclusive in (("maximum", False), ("exclusiveMaximum", True)):
        v = s.get(key)
        if is_finite(v) and (hi is None or v < hi or v == hi and exclusive):
            hi, hi_ex = v, exclusive
    return lo, lo_ex, hi, hi_ex


def _ok_number(value, s):
    try:
        lo, lo_ex, hi, hi_ex = _bounds(s)
        if lo is not None and (value < lo or lo_ex and value == lo):
            return False
        if hi is not None and (value > hi or hi_ex and value == hi):
            return False
        m = s.get("multipleOf")
        if is_finite(m) and m > 0:
            if isinstance(m, float):  # the same float arithmetic as the jsonschema package
                quotient = value / m
                return math.isfinite(quotient) and int(quotient) == quotient
            return not value % m
    except (ArithmeticError, ValueError, TypeError):
        return True
    return True


def _ok_string(value, s):
    lo, hi = count_arg(s.get("minLength"), None), count_arg(s.get("maxLength"), None, False)
    if lo is not None and len(value) < lo or hi is not None and len(value) > hi:
        return False
    pattern = s.get("pattern")
    if isinstance(pattern, str):
        if len(value) > MAX_PATTERN_CHECK:
            return False
        rx = _regex(pattern)
        if rx is not None and not _found(rx, value):
            return False
    fmt = s.get("format")
    return not isinstance(fmt, str) or _format_ok(fmt, value)


def _ok_array(value, s, ctx, depth):
    n = len(value)
    lo, hi = count_arg(s.get("minItems"), None), count_arg(s.get("maxItems"), None, False)
    if lo is not None and n < lo or hi is not None and n > hi:
        return False
    prefix = s.get("prefixItems") if isinstance(s.get("prefixItems"), list) else []
    items = s.get("items", True)
    for i, item in enumerate(value):
        if not _ok(item, prefix[i] if i < len(prefix) else items, ctx, depth):
            return False
    if s.get("uniqueItems") is True:
        try:
            if len(set(_jkey(x) for x in value)) != n:
                return False
        except TypeError:
            pass
    if isinstance(s.get("contains"), (dict, bool)):
        hits = sum(1 for x in value if _ok(x, s["contains"], ctx, depth))
        lo, hi = count_arg(s.get("minContains"), 1), count_arg(s.get("maxContains"), None, False)
        if hits < lo or hi is not None and hits > hi:
            return False
    return True


def _ok_object(value, s, ctx, depth):
    req = s.get("required")
    if isinstance(req, list) and any(isinstance(r, str) and r not in value for r in req):
        return False
    props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
    pats = s.get("patternProperties") if isinstance(s.get("patternProperties"), dict) else {}
    extra = s.get("additionalProperties", True)
    for key, item in value.items():
        matched = key in props
        if matched and not _ok(item, props[key], ctx, depth):
            return False
        for pattern, sub in pats.items():
            if isinstance(key, str) and _search(pattern, key):
                matched = True
                if not _ok(item, sub, ctx, depth):
                    return False
        if not matched and not _ok(item, extra, ctx, depth):
            return False
    lo, hi = count_arg(s.get("minProperties"), None), count_arg(s.get("maxProperties"), None, False)
    if lo is not None and len(value) < lo or hi is not None and len(value) > hi:
        return False
    names = s.get("propertyNames")
    if isinstance(names, (dict, bool)) and not all(_ok(k, names, ctx, depth) for k in value):
        return False
    deps = s.get("dependentRequired")
    if isinstance(deps, dict):
        for key, needed in deps.items():
            if key in value and isinstance(needed, list) and any(n not in value for n in needed):
                return False
    return True


_RX_CACHE = {}


def _regex(pattern):
    """`pattern` compiled by Python's re (ECMA named groups translated), None if it can't be."""
    try:
        return _RX_CACHE[pattern]
    except KeyError:
        pass
    except TypeError:
        return None
    if len(pattern) > MAX_PATTERN:
        return None  # not compiled (nor kept): a client's pattern of megabytes is none a schema means
    source = pattern
    if "(?<" in source or "\\k<" in source:
        source = _ecma_to_python(source)
    try:
        rx = re.compile(source)
    except (re.error, RecursionError, OverflowError, ValueError, TypeError, MemoryError):
        rx = None
    if len(_RX_CACHE) > 512:
        _RX_CACHE.clear()
    _RX_CACHE[pattern] = rx
    return rx


def _ecma_to_python(source):
    out, i = [], 0
    while i < len(source):
        if source.startswith("\\", i):
            if source.startswith("\\k<", i) and source.find(">", i) > 0:
                end = source.find(">", i)
                out.append("(?P=" + source[i + 3:end] + ")")
                i = end + 1
                continue
            out.append(source[i:i + 2])
            i += 2
        elif source.startswith("(?<", i) and source[i + 3:i + 4] not in ("=", "!"):
            out.append("(?P<")
            i += 3
        else:
            out.append(source[i])
            i += 1
    return "".join(out)


def _search(pattern, value):
    rx = _regex(pattern) if isinstance(pattern, str) else None
    return rx is not None and isinstance(value, str) and _found(rx, value)


def _found(rx, value):
    """Whether a client's pattern matches: searched where it cannot stall the server (saferegex), within the
    request's regex time (base.REGEX_BUDGET; past it, or past PATTERN_TIME for one search, it does not)."""
    from .saferegex import RegexTimeout, needs_helper, search
    left = regex_left()
    if left <= 0:
        return False  # the call's time for patterns is spent (searched here or in a helper, all of it counts)
    import time
    t = time.monotonic()
    try:
        if not needs_helper(rx.pattern, value):
            return rx.search(value) is not None
        return search(rx.pattern, value, min(PATTERN_TIME, left)) is not None
    except RegexTimeout:
        return False
    finally:
        spend_regex(time.monotonic() - t)


_FORMAT_RX = {
    "date": r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}\Z",
    "date-time": r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
                 r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})\Z",
    "time": r"\A[0-2][0-9]:[0-5][0-9]:[0-6][0-9](?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?\Z",
    "email": r"\A[^@\s]+@[^@\s]+\Z", "idn-email": r"\A[^@\s]+@[^@\s]+\Z",
    "uri": r"\A[A-Za-z][A-Za-z0-9+.-]*:[^\s]+\Z", "url": r"\A[A-Za-z][A-Za-z0-9+.-]*:[^\s]+\Z",
    "iri": r"\A[A-Za-z][A-Za-z0-9+.-]*:[^\s]+\Z", "uri-reference": r"\A[^\s]*\Z", "iri-reference": r"\A[^\s]*\Z",
    "uri-template": r"\A[^\s]*\Z",
    "uuid": r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z",
    "hostname": r"\A(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z",
    "idn-hostname": r"\A[^\s@/]+\Z",
    "duration": r"\AP(?=[0-9T])(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+W)?(?:[0-9]+D)?"
                r"(?:T(?=[0-9])(?:[0-9]+H)?(?:[0-9]+M)?(?:[0-9]+(?:\.[0-9]+)?S)?)?\Z",
    "byte": r"\A(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z",
    "json-pointer": r"\A(?:/(?:[^~/]|~[01])*)*\Z",
    "relative-json-pointer": r"\A[0-9]+(?:#|(?:/(?:[^~/]|~[01])*)*)\Z",
}


def _format_ok(fmt, value):
    """Whether `value` has string format `fmt` (unknown formats always pass)."""
    fmt = fmt.lower()
    if fmt in ("ipv4", "ipv6"):
        import ipaddress
        try:
            (ipaddress.IPv4Address if fmt == "ipv4" else ipaddress.IPv6Address)(value)
            return True
        except ValueError:
            return False
    if fmt == "regex":
        return _regex(value) is not None
    source = _FORMAT_RX.get(fmt)
    if source is None:
        return True
    if _regex(source).search(value) is None:
        return False
    if fmt in ("date", "date-time"):
        import datetime
        try:
            datetime.date(int(value[0:4]), int(value[5:7]), int(value[8:10]))
        except ValueError:
            return False
    if fmt in ("date-time", "time"):
        clock = value[11:19] if fmt == "date-time" else value[0:8]
        if int(clock[0:2]) > 23 or int(clock[3:5]) > 59 or int(clock[6:8]) > 60:
            return False
    return True


def _format_sample(fmt, k):
    """The k-th sample value of a string format (None when unknown)."""
    fmt = fmt.lower()
    n = "" if k == 0 else str(k + 1)
    samples = {
        "date": "2025-01-%02d" % (1 + k % 28), "date-time": "2025-01-%02dT00:00:00Z" % (1 + k % 28),
        "time": "00:00:%02dZ" % (k % 60), "email": "user%s@example.com" % n,
        "idn-email": "user%s@example.com" % n, "uri": "https://example.com" + (n and "/" + n),
        "uuid": "00000000-0000-4000-8000-%012d" % (k % 10 ** 12), "hostname": "example%s.com" % n,
        "idn-hostname": "example%s.com" % n, "ipv4": "192.0.2.%d" % (1 + k % 254),
        "ipv6": "2001:db8::%x" % (k + 1), "duration": "P%dD" % (k + 1),
        "byte": b64(("example" + n).encode()), "json-pointer": "/example" + n,
        "relative-json-pointer": str(k), "regex": "example" + n, "uri-template": "https://example.com/{id}",
    }
    for alias in ("url", "iri", "uri-reference", "iri-reference"):
        samples[alias] = samples["uri"]
    return samples.get(fmt)

def _copy(value):
    try:
        return copy.deepcopy(value)
    except Exception:
        return value


def _infer_types(view):
    for keys, kind in ((_OBJ_KEYS, "object"), (_ARR_KEYS, "array"), (_NUM_KEYS, "number"), (_STR_KEYS, "string")):
        if any(k in view for k in keys):
            fmt = view.get("format")
            if kind == "string" and fmt in ("int32", "int64", "uint32", "uint64"):
                return ["integer"]
            if kind == "string" and fmt in ("float", "double"):
                return ["number"]
            return [kind]
    return ["string"]


def _gen(schema, ctx, depth, variant=0):
    """A value for `schema` at nesting `depth`; `variant` > 0 asks for a different value."""
    ctx.budget -= 1
    if ctx.budget < -BUDGET or depth > HARD_DEPTH:
        return None
    refs = []
    view = _norm(schema, ctx, refs)
    if view is None:
        return None
    for ref in refs:  # ctx.over: how many $refs recur too often on the current path
        ctx.refs[ref] = ctx.refs.get(ref, 0) + 1
        ctx.over += ctx.refs[ref] == MAX_REF_REPEAT + 1
    try:
        cheap = depth >= MAX_DEPTH or ctx.budget <= 0 or ctx.over > 0
        return _gen_view(view, ctx, depth, variant, cheap)
    finally:
        for ref in refs:
            ctx.over -= ctx.refs[ref] == MAX_REF_REPEAT + 1
            ctx.refs[ref] -= 1


def _gen_view(view, ctx, depth, variant, cheap):
    if "const" in view:
        return _copy(view["const"])
    default = view.get("default")
    if default is not None and _ok(default, view, ctx):
        if isinstance(default, str) and not ctx.text_used:
            return _gen_string(view, ctx, variant, [default])
        return _copy(default)
    for key in ("oneOf", "anyOf"):
        branches = view.get(key)
        if isinstance(branches, list) and branches:
            return _gen_union(view, key, branches, ctx, depth, variant, cheap)
    enum = view.get("enum")
    if isinstance(enum, list) and enum:
        return _gen_enum(view, enum, ctx, variant)
    types = view.get("type")
    if not types:  # inferred from the keywords; other types may do when that one cannot be valid
        types = _infer_types(view)
        types = types + [t for t in ("string", "integer", "boolean", "null") if t not in types]
    if cheap and "null" in types and "type" in view:
        return None
    kinds = [t for t in types if t != "null"] or ["null"]
    if "null" in types and "type" not in view:
        kinds.append("null")
    if len(kinds) > 1 and ("not" in view or "allOf" in view or "type" not in view):  # first type that can be valid
        for kind in kinds:
            start = ctx.text_used
            value = _gen_kind(kind, view, ctx, depth, variant, cheap)
            if _ok(value, view, ctx):
                return value
            ctx.text_used = start
    return _gen_kind(kinds[0], view, ctx, depth, variant, cheap)


def _gen_kind(kind, view, ctx, depth, variant, cheap):
    if kind == "object":
        return _gen_object(view, ctx, depth, variant, cheap)
    if kind == "array":
        return _gen_array(view, ctx, depth, variant, cheap)
    if kind in ("integer", "number"):
        return _gen_number(view, ctx, kind == "integer", variant)
    if kind == "boolean":
        return variant % 2 == 0
    if kind == "null":
        return None
    return _gen_string(view, ctx, variant, [])


def _null_only(schema, ctx):
    view = _norm(schema, ctx, [])
    return view is not None and (view.get("type") == ["null"] or "const" in view and view["const"] is None
                                 or isinstance(view.get("enum"), list) and view["enum"] == [None])


def _cost(schema, ctx, level=0):
    """A rough size of the cheapest value of `schema`, for choosing branches at the depth limit."""
    view = _norm(schema, ctx, [])
    if view is None:
        return 1000
    if "const" in view or isinstance(view.get("enum"), list):
        return 1
    types = view.get("type") or _infer_types(view)
    if "null" in types:
        return 0
    for key in ("oneOf", "anyOf"):
        subs = view.get(key)
        if isinstance(subs, list) and subs:
            return 1 + (min(_cost(s, ctx, level + 1) for s in subs[:UNION_TRIALS]) if level < 2 else 10)
    if types[0] == "array":
        return 5 if count_arg(view.get("minItems"), 0) else 2
    if types[0] == "object":
        req = view.get("required")
        return 2 + 3 * (len(req) if isinstance(req, list) else 0)
    return 1


def _gen_union(view, key, branches, ctx, depth, variant, cheap):
    """The first branch (null-only ones last; cheapest first in cheap mode) whose value validates."""
    rest = dict(view)
    del rest[key]
    rest.pop("default", None)
    if cheap:
        order = [b for _, _, b in sorted((_cost(b, ctx), i, b) for i, b in enumerate(branches[:UNION_TRIALS * 4]))]
    else:
        nulls = [_null_only(b, ctx) for b in branches]
        order = [b for b, n in zip(branches, nulls) if not n] + [b for b, n in zip(branches, nulls) if n]
    start = ctx.text_used
    first = None
    trials = [(b, variant, start) for b in order[:UNION_TRIALS]]
    if key == "oneOf":  # then values without text, then other variants, may match just one branch
        trials += [(b, variant + k, True) for k in (0, 1) for b in order[:UNION_TRIALS]]
    for branch, var, used in trials:
        ctx.text_used = used
        value = _gen({"allOf": [rest, branch]}, ctx, depth + 1, var)
        if first is None:
            first = (value, ctx.text_used)
        if _ok(value, view, ctx):
            return value
    ctx.text_used = first[1]
    return first[0]


def _gen_enum(view, enum, ctx, variant):
    good = [e for e in enum if _ok(e, view, ctx)] or list(enum)
    pick = good[variant % len(good)]
    if isinstance(pick, str) and not ctx.text_used:
        ctx.text_used = True
        if any(isinstance(e, str) and e == ctx.text for e in good):
            return ctx.text
    return _copy(pick)


def _fit(value, view):
    """`value` cut to maxLength and padded with "x" to minLength."""
    hi = count_arg(view.get("maxLength"), None, False)
    lo = min(count_arg(view.get("minLength"), 0), MAX_STRING)
    if hi is not None and len(value) > hi:
        value = value[:hi]
    return value + "x" * (lo - len(value)) if len(value) < lo else value


def _patterns(view):
    found = [view.get("pattern")]
    extra = view.get("allOf")
    if isinstance(extra, list):
        found.extend(x.get("pattern") for x in extra if isinstance(x, dict))
    return [p for p in found if isinstance(p, str)]


def _text_may_meet(pattern, text):
    """Whether the client's text may be offered to a pattern: not when it is long."""
    return not isinstance(pattern, str) or len(text) <= MAX_PATTERN_CHECK


def _gen_string(view, ctx, variant, preferred):
    """text (first string field only), a preferred value, the format sample, "example",
    then strings generated from the patterns: the first that validates."""
    candidates = []
    if not ctx.text_used:
        ctx.text_used = True
        if _text_may_meet(view.get("pattern"), ctx.text):
            candidates.append(_fit(ctx.text, view))
    candidates.extend(preferred)
    fmt = view.get("format")
    sample = _format_sample(fmt, variant) if isinstance(fmt, str) else None
    if sample is not None:
        candidates.append(sample)
    candidates.append(_fit("example" if variant == 0 else "example%d" % (variant + 1), view))
    for value in candidates:
        if _ok(value, view, ctx):
            return value
    attempt = None
    tries = [(e, variant) for e in (0, 1, 2, 4, 8, 16, 64, 256, 1024)] + [(0, variant + 1), (1, variant + 1),
                                                                            (0, variant + 2), (1, variant + 2)]
    lo = min(count_arg(view.get("minLength"), 0), MAX_STRING)
    for pattern in _patterns(view)[:4]:
        for extra, seed in tries:
            value = regex_string(pattern, extra, seed)
            if value is None:
                break
            if attempt is None:
                attempt = value
            pad = "x" * (lo - len(value))  # unanchored patterns may take padding at either end
            for padded in ((value, value + pad, pad + value) if pad else (value,)):
                if _ok(padded, view, ctx):
                    return padded
    for value in _LAST_RESORT:
        if _ok(value, view, ctx):
            return value
    return attempt if attempt is not None else candidates[-1]


def _num_candidates(view, integer, count):
    """Numbers near 1, moved into the bounds and onto the multipleOf grid, nearest first."""
    lo, lo_ex, hi, hi_ex = _bounds(view)
    m = view.get("multipleOf")
    step = m if is_finite(m) and m > 0 else 1
    if integer and not float(step).is_integer():
        from fractions import Fraction
        step = Fraction(repr(float(step))).limit_denominator(10 ** 9).numerator
    anchor = 1
    if lo is not None and (anchor < lo or lo_ex and anchor <= lo):
        anchor = lo
    elif hi is not None and (anchor > hi or hi_ex and anchor >= hi):
        anchor = hi
    try:
        k0 = math.ceil(anchor / step)
    except (ArithmeticError, ValueError):
        return [anchor]
    values = [k * step for k in list(range(k0, k0 + count)) + list(range(k0 - 1, k0 - 1 - count, -1))]
    if not integer and lo is not None and hi is not None:
        values.extend(lo + (hi - lo) * j / 16.0 for j in (8, 4, 12, 2, 6, 10, 14, 1, 3, 5, 7, 9, 11, 13, 15))
    out = []
    for v in values:
        try:
            out.append(int(v) if integer else float(v))
        except (ArithmeticError, ValueError):
            out.append(v)
    return out


def _gen_number(view, ctx, integer, variant):
    found = []
    candidates = _num_candidates(view, integer, variant + 24)
    for value in candidates:
        if _ok(value, view, ctx):
            found.append(value)
            if len(found) > variant:
                return value
    if found:
        return found[-1]
    return candidates[0] if candidates else (1 if integer else 1.0)


def _ordered(props, ordering):
    names = []
    if isinstance(ordering, list):
        names = list(dict.fromkeys(n for n in ordering if isinstance(n, str) and n in props))
    seen = set(names)
    return names + [n for n in props if n not in seen]


def _extra_schema(view, name):
    """The schema a property outside `properties` gets: matching patternProperties, else
    additionalProperties."""
    pats = view.get("patternProperties")
    hits = [s for p, s in pats.items() if _search(p, name)] if isinstance(pats, dict) else []
    if hits:
        return {"allOf": hits}
    extra = view.get("additionalProperties", True)
    return extra if isinstance(extra, (dict, bool)) else True


def _gen_object(view, ctx, depth, variant, cheap):
    props = view.get("properties") if isinstance(view.get("properties"), dict) else {}
    req = view.get("required")
    req = list(dict.fromkeys(r for r in req if isinstance(r, str))) if isinstance(req, list) else []
    need = set(req)
    names = [n for n in _ordered(props, view.get("propertyOrdering")) if props[n] is not False or n in need]
    if cheap:
        names = [n for n in names if n in need]
    hi = count_arg(view.get("maxProperties"), None, False)
    if hi is not None and len(names) > hi:
        room = hi - sum(1 for n in names if n in need)
        kept = []
        for n in names:
            if n in need or room > 0:
                room -= n not in need
                kept.append(n)
        names = kept
    out = {}
    for name in names:
        out[name] = _gen(props[name], ctx, depth + 1, variant)
    for name in req:
        if name not in out:
            out[name] = _gen(_extra_schema(view, name), ctx, depth + 1, variant)
    lo = min(count_arg(view.get("minProperties"), 0), MAX_ITEMS)
    if len(out) < lo:
        _fill_object(view, props, out, lo, ctx, depth, variant)
    return out


def _fill_object(view, props, out, lo, ctx, depth, variant):
    """Add properties until there are `lo`: omitted listed ones, then patternProperties names,
    then "key1", "key2", ... when additionalProperties allows."""
    for name in props:
        if len(out) >= lo:
            return
        if name not in out and props[name] is not False:
            out[name] = _gen(props[name], ctx, depth + 1, variant)
    pats = view.get("patternProperties") if isinstance(view.get("patternProperties"), dict) else {}
    for pattern in pats:
        misses = 0
        for k in range(2 * lo + 8):
            if len(out) >= lo or misses > 8:
                break
            base = regex_string(pattern, 0, 0) if isinstance(pattern, str) else None
            if base is None:
                break
            picks = [regex_string(pattern, 0, k), regex_string(pattern, 1, k), base + str(k)]
            name = next((c for c in picks if c is not None and c not in out and c not in props
                         and _search(pattern, c)), None)
            if name is None:
                misses += 1
                continue
            out[name] = _gen(_extra_schema(view, name), ctx, depth + 1, variant)
    extra = view.get("additionalProperties", True)
    k = 0
    while extra is not False and len(out) < lo and k < lo + MAX_ITEMS:
        k += 1
        name = "key%d" % k
        if name in out or name in props or any(_search(p, name) for p in pats):
            continue
        out[name] = _gen(extra if isinstance(extra, (dict, bool)) else True, ctx, depth + 1, variant)


def _gen_array(view, ctx, depth, variant, cheap):
    prefix = view.get("prefixItems") if isinstance(view.get("prefixItems"), list) else []
    items = view.get("items", True)
    items = items if isinstance(items, (dict, bool)) else True
    lo, hi = count_arg(view.get("minItems"), 0), count_arg(view.get("maxItems"), None, False)
    contains = view.get("contains")
    need = count_arg(view.get("minContains"), 1) if isinstance(contains, (dict, bool)) else 0
    n = max(lo, need) if cheap else max(lo, need, 1, len(prefix))
    if items is False:
        n = min(n, len(prefix))
    if hi is not None:
        n = min(n, hi)
    n = min(n, MAX_ITEMS)
    unique = view.get("uniqueItems") is True
    out, seen = [], set()
    for i in range(n):
        sub = prefix[i] if i < len(prefix) else items
        if i < need:
            sub = {"allOf": [sub, contains]}
        if not unique:
            out.append(_gen(sub, ctx, depth + 1, variant))
            continue
        for j in range(UNIQUE_TRIES):
            value = _gen(sub, ctx, depth + 1, variant + i + j)
            try:
                key = _jkey(value)
            except Exception:
                key = ("o", id(value))
            if key not in seen:
                seen.add(key)
                out.append(value)
                break
        else:
            break
    return out
