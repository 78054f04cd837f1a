"""Regex -> string: a string that matches a JSON Schema ``pattern``."""

from .base import MISSING


MAX_STRING = 10000  # clamp for minLength and regex repeats


class _RxUnsupported(Exception):
    pass


_RX_CHARS = ("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
             " -_.,:;@/+#!?$%&*=~^()[]{}<>|'\"`\\\t\n\r")
_RX_EXOTIC = "\u00e9\u00df\u4e2d\u00a0\u2603"
_RX_TREES = {}


def regex_string(pattern, extra, seed):
    """A string for `pattern`: repeats at their minimum plus `extra`, the `seed`-th choice in
    classes and alternations (None when the pattern is out of reach)."""
    tree = _RX_TREES.get(pattern, MISSING)
    if tree is MISSING:
        try:
            tree = _RxParser(pattern).parse()
        except Exception:
            tree = None
        if len(_RX_TREES) > 256:
            _RX_TREES.clear()
        _RX_TREES[pattern] = tree
    if tree is None:
        return None
    out = []
    try:
        _rx_emit(tree, extra, seed, out)
    except Exception:
        return None
    return "".join(out)[:MAX_STRING]


class _RxParser(object):
    """Parses a regex into ("seq", items) / ("alt", branches) / ("grp", node) / ("rep", node, lo, hi)
    / ("lit", ch) / ("set", negated, items, cache) / ("any",) / ("nop",) nodes."""

    def __init__(self, pattern):
        self.p = pattern
        self.i = 0
        self.depth = 0

    def peek(self, k=0):
        j = self.i + k
        return self.p[j] if j < len(self.p) else ""

    def parse(self):
        node = self.alternation()
        if self.i != len(self.p):
            raise _RxUnsupported("unbalanced )")
        return node

    def alternation(self):
        self.depth += 1
        if self.depth > 64:
            raise _RxUnsupported("nesting")
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        self.depth -= 1
        return ("alt", branches) if len(branches) > 1 else branches[0]

    def sequence(self):
        items = []
        while self.i < len(self.p) and self.p[self.i] not in "|)":
            items.append(self.quantified(self.atom()))
        return ("seq", items)

    def atom(self):
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            return self.group()
        if c == "[":
            return self.char_class()
        if c == "\\":
            return self.escape(False)
        if c == ".":
            return ("any",)
        if c in "^$":
            return ("nop",)
        if c in "*+?":
            raise _RxUnsupported("nothing to repeat")
        return ("lit", c)

    def quantified(self, node):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            bounds = self.braces()
            if bounds is None:
                return node
            lo, hi = bounds
        else:
            return node
        if self.peek() in ("?", "+"):
            self.i += 1
        return node if node[0] == "nop" else ("rep", node, lo, hi)

    def braces(self):
        end = self.p.find("}", self.i)
        if end < 0:
            return None
        low, comma, high = self.p[self.i + 1:end].partition(",")
        digits = lambda s: s.isdigit() and s.isascii()
        if not (digits(low) or low == "" and comma) or high and not digits(high):
            return None
        if len(low) > 9 or len(high) > 9:
            raise _RxUnsupported("repeat count too large")
        lo = int(low) if low else 0
        hi = (int(high) if high else None) if comma else lo
        if hi is not None and hi < lo:
            raise _RxUnsupported("bad repeat")
        self.i = end + 1
        return min(lo, MAX_STRING), hi

    def group(self):
        if self.peek() == "?":
            self.i += 1
            c = self.peek()
            if c in (":", ">"):
                self.i += 1
            elif c == "P" and self.peek(1) == "<" or c == "<" and self.peek(1) not in ("=", "!", ""):
                end = self.p.find(">", self.i)
                if end < 0:
                    raise _RxUnsupported("bad group name")
                self.i = end + 1
            elif c == "#":
                end = self.p.find(")", self.i)
                if end < 0:
                    raise _RxUnsupported("unterminated comment")
                self.i = end + 1
                return ("nop",)
            elif c in ("=", "!") or c == "<" and self.peek(1) in ("=", "!"):
                behind = self.p.startswith("<=", self.i)  # a positive lookbehind's text is emitted;
                self.i += 2 if c == "<" else 1            # other lookarounds are left to the re check
                node = self.alternation()
                if self.peek() != ")":
                    raise _RxUnsupported("missing )")
                self.i += 1
                return ("grp", node) if behind else ("nop",)
            elif c and c in "aiLmsux-":
                while self.peek() and self.peek() in "aiLmsux-":
                    self.i += 1
                if self.peek() == ")":
                    self.i += 1
                    return ("nop",)
                if self.peek() != ":":
                    raise _RxUnsupported("bad flags")
                self.i += 1
            else:
                raise _RxUnsupported("backreference or conditional")
        node = self.alternation()
        if self.peek() != ")":
            raise _RxUnsupported("missing )")
        self.i += 1
        return ("grp", node)

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        items, first = [], True
        while True:
            if self.i >= len(self.p):
                raise _RxUnsupported("unterminated [")
            if self.p[self.i] == "]" and not first:
                self.i += 1
                return ("set", negate, items, [None])
            first = False
            lo = self.class_atom()
            if isinstance(lo, str) and self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi = self.class_atom()
                if isinstance(hi, str):
                    if ord(hi) < ord(lo):
                        raise _RxUnsupported("bad range")
                    items.append((ord(lo), ord(hi)))
                else:
                    items.extend([(ord(lo), ord(lo)), (45, 45), hi])
                continue
            items.append((ord(lo), ord(lo)) if isinstance(lo, str) else lo)

    def class_atom(self):
        c = self.p[self.i]
        self.i += 1
        return self.escape(True) if c == "\\" else c

    def escape(self, in_class):
        if self.i >= len(self.p):
            raise _RxUnsupported("trailing backslash")
        c = self.p[self.i]
        self.i += 1
        if c in "dDwWsS":
            return ("cat", c) if in_class else ("set", False, [("cat", c)], [None])
        if not in_class and c in "bBAZzG":
            return ("nop",)
        simple = {"b": "\b", "n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
        if c in simple:
            ch = simple[c]
        elif c in "xuU":
            ch = self.hex_escape(c)
        elif c == "c" and self.peek().isalpha():
            ch = chr(ord(self.peek()) % 32)
            self.i += 1
        elif c.isdigit() or c in "pPkNg":
            raise _RxUnsupported("backreference or property escape")
        else:
            ch = c
        return ch if in_class else ("lit", ch)

    def hex_escape(self, c):
        if c == "u" and self.peek() == "{":
            end = self.p.find("}", self.i)
            digits = self.p[self.i + 1:end] if end > 0 else ""
            self.i = end + 1 if end > 0 else len(self.p)
        else:
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + width]
            self.i += width
        if not digits or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise _RxUnsupported("bad hex escape")
        try:
            return chr(int(digits, 16))
        except (ValueError, OverflowError):
            raise _RxUnsupported("bad code point")


def _rx_cat(ch, cat):
    low = cat.lower()
    if low == "d":
        hit = ch.isdecimal()
    elif low == "w":
        hit = ch.isalnum() or ch == "_"
    else:
        hit = ch.isspace()
    return hit if cat.islower() else not hit


def _rx_in(ch, node):
    hit = False
    for item in node[2]:
        hit = _rx_cat(ch, item[1]) if item[0] == "cat" else item[0] <= ord(ch) <= item[1]
        if hit:
            break
    return hit != node[1]


def _rx_pick(node, seed):
    members = node[3][0]
    if members is None:
        members = [c for c in _RX_CHARS if _rx_in(c, node)] or [c for c in _RX_EXOTIC if _rx_in(c, node)]
        if not members and not node[1] and node[2] and node[2][0][0] != "cat":
            members = [chr(node[2][0][0])]
        node[3][0] = members = members or ["\u2603"]
    return members[seed % len(members)]


def _rx_emit(node, extra, seed, out):
    if len(out) >= MAX_STRING:
        return
    kind = node[0]
    if kind == "lit":
        out.append(node[1])
    elif kind == "seq":
        for item in node[1]:
            _rx_emit(item, extra, seed, out)
    elif kind == "alt":
        _rx_emit(node[1][seed % len(node[1])], extra, seed, out)
    elif kind == "grp":
        _rx_emit(node[1], extra, seed, out)
    elif kind == "rep":
        lo, hi = node[2], node[3]
        times = lo + extra if hi is None else min(hi, lo + extra)
        for _ in range(min(times, MAX_STRING)):
            if len(out) >= MAX_STRING:
                break
            _rx_emit(node[1], extra, seed, out)
    elif kind == "set":
        out.append(_rx_pick(node, seed))
    elif kind == "any":
        out.append(_RX_CHARS[seed % 62])
