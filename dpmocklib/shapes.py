"""Shapes: request bodies, typed as the SDKs type them, and the 400 that names a wrong field."""

from .base import ANTHROPIC, GEMINI
from .providers import PROVIDERS, invalid


class Shape:
    """What a request field must be: ``validate(value, spec, path)`` checks a body against a spec.

    A spec is a type or a tuple of types (``int`` excludes ``bool``), ``[spec]`` (a list of
    such), ``{name: spec}`` (an object whose given fields are such; others are not checked),
    ``Shape.any`` (anything), or ``Shape.of(spec, ...)`` (any one of several specs).
    """

    any = object()

    def __init__(self, *options):
        self.options = options

    @classmethod
    def of(cls, *options):
        return cls(*options)


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
               list: "an array", type(None): "null"}


def _describe(spec):
    if isinstance(spec, list):
        return "an array"
    if isinstance(spec, dict):
        return "an object"
    if isinstance(spec, Shape):
        return " or ".join(_describe(o) for o in spec.options)
    if isinstance(spec, tuple):
        return " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in spec)
    return _TYPE_WORDS.get(spec, getattr(spec, "__name__", "?"))


def _is(value, types):
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def shape_error(value, spec, path):
    """The first place where ``value`` does not fit ``spec``: (path parts, expected words), else None."""
    if spec is Shape.any:
        return None
    if isinstance(spec, Shape):
        errors = []
        if value.__class__ in spec.options:
            return None  # the common case: a plain value of a listed type
        for option in spec.options:
            err = shape_error(value, option, path)
            if err is None:
                return None
            errors.append(err)
        deeper = [e for e in errors if len(e[0]) > len(path)]
        return deeper[0] if len(deeper) == 1 else (path, _describe(spec))
    if isinstance(spec, list):
        if not isinstance(value, list):
            return path, "an array"
        for i, item in enumerate(value):
            err = shape_error(item, spec[0], path + [i])
            if err:
                return err
        return None
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return path, "an object"
        for name, item in value.items():
            sub = spec.get(name, Shape.any)
            if sub is Shape.any or (sub.__class__ is type and item.__class__ is sub):
                continue  # the common cases, without a call
            err = shape_error(item, sub, path + [name])
            if err:
                return err
        return None
    return None if _is(value, spec) else (path, _describe(spec))


def _type_name(value):
    return {True: "a boolean", False: "a boolean"}.get(value, None) if isinstance(value, bool) else \
        _TYPE_WORDS.get(type(value), type(value).__name__)


def validate(provider, body, spec):
    """Raise the provider's 400 naming the first field of ``body`` that does not fit ``spec``."""
    err = shape_error(body, spec, [])
    if err is None:
        return
    parts, expected = err
    value = body
    for p in parts:
        value = value[p]
    field = PROVIDERS[provider].field_path(parts) or "body"
    if provider == ANTHROPIC:
        raise invalid("%s: Input should be %s, not %s" % (field, expected, _type_name(value)))
    if provider == GEMINI:
        raise invalid("Invalid value at '%s': expected %s, got %s" % (field, expected, _type_name(value)))
    raise invalid("Invalid type for '%s': expected %s, but got %s instead." % (field, expected, _type_name(value)),
                  field, "invalid_type")
