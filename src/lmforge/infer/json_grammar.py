"""A JSON Schema as a byte-level pushdown automaton (the grammar behind `constrain.py`).

`compile_schema(schema)` turns the schema into nodes: object (listed properties), free object
(any keys), array, string, number, integer, literal (enum, const, true, false, null) and union
(anyOf, oneOf, type lists); a local $ref is an edge to its node, so recursive schemas are cycles.
`Grammar` runs them: a thread is a stack of frames (tuples), a state is the frozenset of live
threads (the branches of a union run side by side, as in an NFA), and every frame knows the
fewest bytes that finish it, so a state knows the fewest bytes to a complete document.

What is generated (docs/inference.md, *Constrained decoding*): properties in the schema's
order; whitespace only as one optional space after ':' and ','; nothing around the value;
numbers of at most 30 integer and 30 fraction digits and two exponent digits (so every
number parses, finite); strict UTF-8; \\u escapes only for real characters
(surrogates only as a high-low pair).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

INF = 1 << 30  # "never closes" (an unsatisfiable branch): larger than any budget

# ---- byte classes -------------------------------------------------------------------------------
QUOTE, BACKSLASH, COMMA, COLON, SPACE = 0x22, 0x5C, 0x2C, 0x3A, 0x20
LBRACE, RBRACE, LBRACKET, RBRACKET, MINUS = 0x7B, 0x7D, 0x5B, 0x5D, 0x2D
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")

# strict UTF-8 (RFC 3629): state = what the next byte must be; 0 = between characters
UTF8_LEAD = {**{b: 1 for b in range(0xC2, 0xE0)}, 0xE0: 4, **{b: 2 for b in range(0xE1, 0xED)}, 0xED: 5,
             0xEE: 2, 0xEF: 2, 0xF0: 6, 0xF1: 3, 0xF2: 3, 0xF3: 3, 0xF4: 7}
UTF8_CONT = {1: (0x80, 0xBF, 0), 2: (0x80, 0xBF, 1), 3: (0x80, 0xBF, 2), 4: (0xA0, 0xBF, 1),  # E0: no overlong
             5: (0x80, 0x9F, 1), 6: (0x90, 0xBF, 2), 7: (0x80, 0x8F, 2)}  # ED: no surrogates; F0/F4: U+10000..10FFFF
UTF8_PENDING = (0, 1, 2, 3, 2, 2, 3, 3)  # bytes still needed to finish the character


def _escape_table() -> tuple[dict, tuple]:
    """The escape automaton inside a string: state -> {byte: next state}, and the bytes each state
    still needs. 0 = plain content; 1 after '\\'; 2..6 a \\uXXXX (4 = after \\uD: 0-7 continue a
    plain code point, 8-B start a high surrogate that must be followed by \\uDC00-\\uDFFF: 7..14)."""
    hex_not_d = HEX - frozenset(b"dD")
    t = {1: {b: 0 for b in b'"\\/bfnrt'} | {ord("u"): 2},
         2: {b: 3 for b in hex_not_d} | {b: 4 for b in b"dD"},
         3: {b: 5 for b in HEX}, 5: {b: 6 for b in HEX}, 6: {b: 0 for b in HEX},
         4: {b: 5 for b in b"01234567"} | {b: 7 for b in b"89abAB"},
         7: {b: 8 for b in HEX}, 8: {b: 9 for b in HEX}, 9: {BACKSLASH: 10}, 10: {ord("u"): 11},
         11: {b: 12 for b in b"dD"}, 12: {b: 13 for b in b"cdefCDEF"}, 13: {b: 14 for b in HEX}, 14: {b: 0 for b in HEX}}
    remaining = (0, 1, 4, 3, 3, 2, 1, 8, 7, 6, 5, 4, 3, 2, 1)
    return t, remaining


ESCAPE, ESCAPE_CLOSE = _escape_table()

# frame phases (objects, free objects, arrays share the names)
OPEN, KEY, COLON_NEXT, AFTER_COLON, AFTER_COLON_SP, VALUE, AFTER_COMMA, AFTER_COMMA_SP = range(8)
# number phases
N_SIGN, N_ZERO, N_INT, N_DOT, N_FRAC, N_EXP_MARK, N_EXP_SIGN, N_EXP = range(8)
MAX_INT_DIGITS = 30  # a float of 30 digits times 1e99 is finite; and far below Python's int-parsing limit
MAX_FRAC_DIGITS = 30
MAX_EXP_DIGITS = 2

ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "default", "examples",
                         "deprecated", "readOnly", "writeOnly", "$defs", "definitions",
                         "discriminator"})  # OpenAPI's (pydantic writes it); oneOf is checked on its own
SUPPORTED = frozenset({"type", "properties", "required", "additionalProperties", "enum", "const", "items",
                       "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum",
                       "exclusiveMinimum", "exclusiveMaximum", "anyOf", "oneOf", "$ref"})
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


# ---- 1. schema -> nodes -------------------------------------------------------------------------
@dataclass
class Node:
    """One schema position. kind: object | free_object | array | string | number | integer |
    literal | union | alias ($ref placeholder, resolved after compiling)."""

    kind: str
    props: list = field(default_factory=list)  # object: [(key bytes '"name"', node id, required)]
    value: int = -1  # free_object values, array items, alias target
    lo: int | None = None  # integer minimum / array minItems / string minLength (as ints)
    hi: int | None = None
    strict: tuple = (False, False)  # number: exclusiveMinimum / exclusiveMaximum (lo, hi are Fractions)
    options: list = field(default_factory=list)  # literal: serialized values (bytes)
    alts: list = field(default_factory=list)  # union: node ids
    # derived after compiling (Grammar._derive)
    prefixes: dict = field(default_factory=dict)  # literal: prefix -> bytes still needed (min)
    first_req: list = field(default_factory=list)  # object: first required index at or after i
    rest: list = field(default_factory=list)  # object: bytes to close after a value, next index i
    cost: list = field(default_factory=list)  # object: bytes of key, colon and shortest value j


def _schema_error(path: str, msg: str) -> ValueError:
    return ValueError(f"response_format json_schema at {path or '#'}: {msg}")


def _dump(value) -> bytes:
    """A literal's only accepted spelling: compact JSON, UTF-8, no ASCII escaping."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _type_set(types) -> frozenset:
    """JSON types in the sense of "which values can match": integer is a kind of number."""
    return frozenset("number" if t == "integer" else t for t in types)


class _Compiler:
    """Schema dict -> list of Nodes; `compile(schema)` returns (node id, the types it may match)."""

    def __init__(self, root_schema: dict):
        self.root = root_schema
        self.nodes: list[Node] = []
        self.refs: dict[str, int] = {}
        self.any_id = self._any()
        self.free_key = self._add(Node("string", lo=0))

    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _any(self) -> int:
        """Any JSON value (json_object's values, and schemas like {} or true)."""
        any_id = self._add(Node("union"))
        alts = [self._add(Node("free_object", value=any_id)), self._add(Node("array", value=any_id, lo=0)),
                self._add(Node("string", lo=0)), self._add(Node("number")),
                self._add(Node("literal", options=[b"true", b"false", b"null"]))]
        self.nodes[any_id].alts = alts
        return any_id

    def compile(self, schema, path: str = "") -> tuple[int, frozenset]:
        if schema is True or schema == {}:
            return self.any_id, _type_set(TYPES)
        if schema is False:
            raise _schema_error(path, "the schema false matches nothing")
        if not isinstance(schema, dict):
            raise _schema_error(path, f"expected a schema object, got {schema!r}")
        for key in schema:
            if key not in SUPPORTED and key not in ANNOTATIONS:
                raise _schema_error(path, f"keyword {key!r} is not supported (supported: {', '.join(sorted(SUPPORTED))})")
        constraints = set(schema) - ANNOTATIONS
        if "$ref" in schema:
            if constraints - {"$ref"}:
                raise _schema_error(path, f"$ref with sibling keywords {sorted(constraints - {'$ref'})} is not supported")
            return self._ref(schema["$ref"], path)
        for word in ("anyOf", "oneOf"):
            if word in schema:
                if constraints - {word}:
                    raise _schema_error(path, f"{word} with sibling keywords {sorted(constraints - {word})} is not supported "
                                              f"(move them into each branch)")
                return self._union(schema[word], word, path)
        if "const" in schema or "enum" in schema:
            return self._literal(schema, path)
        types = schema.get("type")
        if types is None:
            types = _infer_type(schema)
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
            raise _schema_error(path, f"type {schema.get('type')!r} is not a JSON type or a non-empty list of them ({', '.join(TYPES)})")
        ids = [self._typed(schema, t, path) for t in dict.fromkeys(types)]
        if len(ids) == 1:
            return ids[0], _type_set(types)
        return self._add(Node("union", alts=ids)), _type_set(types)

    def _ref(self, ref, path: str) -> tuple[int, frozenset]:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _schema_error(path, f"$ref {ref!r}: only local references (#, #/$defs/Name) are supported")
        if ref in self.refs:
            return self.refs[ref], _type_set(TYPES)
        target = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise _schema_error(path, f"$ref {ref!r} does not resolve")
            target = target[part]
        alias = self._add(Node("alias"))
        self.refs[ref] = alias
        self.nodes[alias].value, types = self.compile(target, ref)
        return alias, types

    def _union(self, branches, word: str, path: str) -> tuple[int, frozenset]:
        if not isinstance(branches, list) or not branches:
            raise _schema_error(path, f"{word} must be a non-empty list of schemas")
        compiled = [self.compile(b, f"{path}/{word}/{i}") for i, b in enumerate(branches)]
        if word == "oneOf":
            for i in range(len(branches)):
                for j in range(i + 1, len(branches)):
                    if not self._disjoint(branches[i], compiled[i][1], branches[j], compiled[j][1]):
                        raise _schema_error(path, f"oneOf branches {i} and {j} may both match one value, so a generated "
                                                  f"value could fail oneOf; supported are branches of different types, "
                                                  f"with disjoint enum/const values, or objects with a required property "
                                                  f"whose const/enum values differ (a discriminator); else use anyOf")
        types = frozenset().union(*(t for _, t in compiled))
        return self._add(Node("union", alts=[i for i, _ in compiled])), types

    def _disjoint(self, a, ta, b, tb) -> bool:
        """Whether no value can match both schemas (decided on the cases oneOf is written for:
        different declared types, disjoint enum/const values, a discriminator property)."""
        a, b = self._resolve(a), self._resolve(b)
        if not self._declared_types(a) & self._declared_types(b):
            return True
        la, lb = _literal_values(a), _literal_values(b)
        if la is not None and lb is not None:
            return not (la & lb)
        if isinstance(a, dict) and isinstance(b, dict):
            both = set(a.get("required", [])) & set(b.get("required", []))
            for name in both:
                va = _literal_values(self._resolve(a.get("properties", {}).get(name)))
                vb = _literal_values(self._resolve(b.get("properties", {}).get(name)))
                if va is not None and vb is not None and not (va & vb):
                    return True
        return False

    def _resolve(self, schema, depth: int = 0):
        """The schema a $ref chain ends at (the schema itself without $ref; None if unresolvable)."""
        while isinstance(schema, dict) and "$ref" in schema and depth < 64:
            target, ref = self.root, schema["$ref"]
            for part in ref[2:].split("/") if isinstance(ref, str) and ref.startswith("#/") else []:
                target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
            schema, depth = target, depth + 1
        return schema

    def _declared_types(self, schema, depth: int = 0) -> frozenset:
        """The JSON types a schema can match under JSON Schema's rules (a schema that names no
        type, const or enum matches every type)."""
        schema = self._resolve(schema)
        if not isinstance(schema, dict) or depth > 32:
            return _type_set(TYPES)
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema.get("enum") or []
            return _type_set({_json_type(v) for v in values})
        for word in ("anyOf", "oneOf"):
            if isinstance(schema.get(word), list):
                return frozenset().union(*(self._declared_types(b, depth + 1) for b in schema[word]))
        t = schema.get("type")
        if t is None:
            return _type_set(TYPES)
        return _type_set([t] if isinstance(t, str) else t)

    def _literal(self, schema: dict, path: str) -> tuple[int, frozenset]:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise _schema_error(path, "enum must be a non-empty list")
        types = schema.get("type")
        if types is not None:  # keep the values of the given type(s)
            allowed = {types} if isinstance(types, str) else set(types)
            if "number" in allowed:
                allowed.add("integer")
            values = [v for v in values if _json_type(v) in allowed]
            if not values:
                raise _schema_error(path, f"no enum/const value has type {types!r}")
        options = list(dict.fromkeys(_dump(v) for v in values))
        return self._add(Node("literal", options=options)), _type_set({_json_type(v) for v in values})

    def _typed(self, schema: dict, t: str, path: str) -> int:
        if t == "object":
            return self._object(schema, path)
        if t == "array":
            items = schema.get("items", True)
            if isinstance(items, list):
                raise _schema_error(path, "items as a list (tuple validation) is not supported")
            lo, hi = _count_bounds(schema, "minItems", "maxItems", path)
            item, _ = self.compile(items, f"{path}/items")
            return self._add(Node("array", value=item, lo=lo, hi=hi))
        if t == "string":
            lo, hi = _count_bounds(schema, "minLength", "maxLength", path)
            return self._add(Node("string", lo=lo, hi=hi))
        if t == "integer":
            lo, hi = _integer_bounds(schema, path)
            return self._add(Node("integer", lo=lo, hi=hi))
        if t == "number":
            lo, hi, strict = _number_bounds(schema, path)
            return self._add(Node("number", lo=lo, hi=hi, strict=strict))
        return self._add(Node("literal", options=[b"true", b"false"] if t == "boolean" else [b"null"]))

    def _object(self, schema: dict, path: str) -> int:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(properties, dict):
            raise _schema_error(path, "properties must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required) or len(set(required)) != len(required):
            raise _schema_error(path, "required must be a list of distinct property names")
        if not isinstance(extra, (bool, dict)):
            raise _schema_error(path, "additionalProperties must be a boolean or a schema")
        if not properties and not required and extra is not False:  # any keys
            value, _ = self.compile(extra, f"{path}/additionalProperties")
            return self._add(Node("free_object", value=value))
        node = self._add(Node("object"))
        props = []
        for name, sub in properties.items():
            value, _ = self.compile(sub, f"{path}/properties/{name}")
            props.append((_dump(name), value, name in required))
        for name in required:
            if name not in properties:
                if extra is False:
                    raise _schema_error(path, f"required property {name!r} is not in properties and additionalProperties is false")
                value, _ = self.compile(extra, f"{path}/additionalProperties")
                props.append((_dump(name), value, True))
        self.nodes[node].props = props
        return node


def _infer_type(schema: dict) -> list[str]:
    """The type a schema without "type" is generated as, from its keywords (any value if none)."""
    if {"properties", "required", "additionalProperties"} & set(schema):
        return ["object"]
    if {"items", "minItems", "maxItems"} & set(schema):
        return ["array"]
    if {"minLength", "maxLength"} & set(schema):
        return ["string"]
    if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(schema):
        return ["integer"]
    return list(TYPES)


def _literal_values(schema):
    """{(type, value)} of a const/enum schema, else None (bool kept apart from 1 and 0)."""
    if not isinstance(schema, dict) or not ("const" in schema or "enum" in schema):
        return None
    values = [schema["const"]] if "const" in schema else schema["enum"]
    if not isinstance(values, list):
        return None
    return {(_type_set([_json_type(v)]), _dump(v if not isinstance(v, float) or not v.is_integer() else int(v))) for v in values}


def _count_bounds(schema: dict, lo_word: str, hi_word: str, path: str) -> tuple[int, int | None]:
    lo, hi = schema.get(lo_word, 0), schema.get(hi_word)
    for word, v in ((lo_word, lo), (hi_word, hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise _schema_error(path, f"{word} must be an integer >= 0, got {v!r}")
    if hi is not None and hi < lo:
        raise _schema_error(path, f"{hi_word}={hi} is below {lo_word}={lo}")
    return lo, hi


def _integer_bounds(schema: dict, path: str) -> tuple[int | None, int | None]:
    """[lo, hi] of the integers the schema allows (None = unbounded)."""
    def number(word):
        v = schema.get(word)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise _schema_error(path, f"{word} must be a number, got {v!r}")
        return v

    lo, hi = number("minimum"), number("maximum")
    lo = None if lo is None else math.ceil(lo)
    hi = None if hi is None else math.floor(hi)
    ex_lo, ex_hi = number("exclusiveMinimum"), number("exclusiveMaximum")
    if ex_lo is not None:
        lo = max(lo if lo is not None else -math.inf, math.floor(ex_lo) + 1)
    if ex_hi is not None:
        hi = min(hi if hi is not None else math.inf, math.ceil(ex_hi) - 1)
    if lo is not None and hi is not None and lo > hi:
        raise _schema_error(path, f"no integer lies between minimum {lo} and maximum {hi}")
    for word, v in (("minimum", lo), ("maximum", hi)):
        if v is not None and len(str(abs(v))) > MAX_INT_DIGITS:
            raise _schema_error(path, f"{word} {v} has more than {MAX_INT_DIGITS} digits (integers are generated with at most that many)")
    return lo, hi


def _number_bounds(schema: dict, path: str) -> tuple:
    """(lo, hi, (lo strict, hi strict)) of a number schema, as exact Fractions (None = unbounded)."""
    def value(word):
        v = schema.get(word)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise _schema_error(path, f"{word} must be a number, got {v!r}")
        return None if v is None else Fraction(v)

    lo, hi, lo_strict, hi_strict = value("minimum"), value("maximum"), False, False
    ex_lo, ex_hi = value("exclusiveMinimum"), value("exclusiveMaximum")
    if ex_lo is not None and (lo is None or ex_lo >= lo):
        lo, lo_strict = ex_lo, True
    if ex_hi is not None and (hi is None or ex_hi <= hi):
        hi, hi_strict = ex_hi, True
    if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_strict or hi_strict))):
        raise _schema_error(path, f"no number lies between the minimum {float(lo)} and the maximum {float(hi)}")
    for v in (lo, hi):
        if v is not None and abs(v) >= 10**MAX_INT_DIGITS:
            raise _schema_error(path, f"number bounds must have at most {MAX_INT_DIGITS} integer digits")
    return lo, hi, (lo_strict, hi_strict)


def _bounded_close(node: Node, text: str) -> int | None:
    if node.kind == "integer":
        return _int_close(text, node.lo, node.hi)
    return _dec_close(text, node.lo, node.hi, *node.strict)


@lru_cache(maxsize=65536)
def _dec_close(text: str, lo, hi, lo_strict: bool, hi_strict: bool) -> int | None:
    """Fewest characters to append to the decimal prefix `text` ('-', '1', '0.', '-2.5'; no
    exponent) for a number inside the bounds; None when none does. Digit runs are capped as in
    `Grammar._step_number`.

    >>> _dec_close("0.", Fraction(1, 4), Fraction(1, 2), False, True), _dec_close("0.5", Fraction(1, 4), Fraction(1, 2), False, True)
    (1, None)
    """
    neg = text.startswith("-")
    body = text[1:] if neg else text
    if not body:
        best = [c + 1 for d in "0123456789" if (c := _dec_close(text + d, lo, hi, lo_strict, hi_strict)) is not None]
        return min(best) if best else None
    if neg:  # bounds on the magnitude
        lo, hi, lo_strict, hi_strict = (None if hi is None else -hi), (None if lo is None else -lo), hi_strict, lo_strict
    int_part, dot, frac = body.partition(".")

    def fits(base: int, scale: int, count: int) -> bool:
        """Is some (base + r) / scale, 0 <= r < count, inside [lo, hi]?"""
        r_lo, r_hi = 0, count - 1
        if lo is not None:
            t = lo * scale - base
            r_lo = max(r_lo, math.floor(t) + 1 if lo_strict else math.ceil(t))
        if hi is not None:
            t = hi * scale - base
            r_hi = min(r_hi, math.ceil(t) - 1 if hi_strict else math.floor(t))
        return r_lo <= r_hi

    if dot:
        k = len(frac)
        for f in range(max(k, 1), MAX_FRAC_DIGITS + 1):  # f fraction digits in all
            if fits(int(int_part + frac) * 10 ** (f - k), 10**f, 10 ** (f - k)):
                return f - k
        return None
    D = int(int_part)
    best = None
    for j in range(0, (0 if int_part == "0" else MAX_INT_DIGITS - len(int_part)) + 1):  # j more integer digits
        if best is not None and j >= best:
            break
        grid = 10**MAX_FRAC_DIGITS
        if not fits(D * 10**j * grid, grid, 10**j * grid):  # not even on the finest grid
            continue
        if fits(D * 10**j, 1, 10**j):
            best = j
            break
        for f in range(1, MAX_FRAC_DIGITS + 1):
            if fits(D * 10 ** (j + f), 10**f, 10 ** (j + f)):
                best = j + 1 + f if best is None else min(best, j + 1 + f)
                break
    return best


def _int_close(text: str, lo: int | None, hi: int | None) -> int | None:
    """Fewest digits to append to the integer prefix `text` ('-', '-1', '0', '12') to land in
    [lo, hi]; None when no completion does.

    >>> _int_close("1", 100, 199), _int_close("2", 100, 199), _int_close("-", -20, -3)
    (2, None, 1)
    """
    neg = text.startswith("-")
    digits = text[1:] if neg else text
    if not digits:
        best = [c + 1 for d in "123456789" if (c := _int_close(text + d, lo, hi)) is not None]
        return min(best) if best else None
    if digits == "0":
        return 0 if (lo is None or lo <= 0) and (hi is None or hi >= 0) and not neg else None
    lo_ = -math.inf if lo is None else lo
    hi_ = math.inf if hi is None else hi
    head = int(digits)
    bound = max(abs(lo_) if lo is not None else 0, abs(hi_) if hi is not None else 0, 1)
    for m in range(0, 400):
        a, b = head * 10**m, head * 10**m + 10**m - 1  # the values with this prefix and m more digits
        if neg:
            a, b = -b, -a
        if a <= hi_ and b >= lo_:
            return m
        if head * 10**m > bound:
            return None
    return None


# ---- 2. the automaton ---------------------------------------------------------------------------
class Grammar:
    """The byte-level automaton of one compiled schema (see the module docstring).

    Frames: ('R', root) before the document; ('S', node, escape, utf8, n chars); ('N', node,
    phase, aux) numbers (aux: the length of the current digit run, or a bounded integer's text
    so far); ('L', node, prefix) literals;
    ('O', node, phase, i, key prefix) objects; ('F', node, phase) free objects; ('A', node,
    phase, count) arrays. A frame's step returns the frame sequences that replace it (() when
    the value ended with this byte); a frame that may end (a number, a literal) may also be
    popped, its parent taking the byte.
    """

    def __init__(self, nodes: list[Node], root: int, free_key: int):
        self.nodes = _resolve_aliases(nodes)
        self.root, self.free_key = root, free_key
        self.min_size = self._min_sizes()
        self._derive()
        self.root_min = self.min_size[self._target(root)]
        self._close: dict = {}
        self._state_close: dict = {}
        self._trans: dict = {}

    def _target(self, i: int) -> int:
        while self.nodes[i].kind == "alias":
            i = self.nodes[i].value
        return i

    def _min_sizes(self) -> list[int]:
        """Fewest bytes of a value of each node, as a fixpoint (recursive schemas)."""
        size = [INF] * len(self.nodes)
        changed = True
        while changed:
            changed = False
            for i, node in enumerate(self.nodes):
                s = min(self._node_min(node, size), INF)
                if s < size[i]:
                    size[i], changed = s, True
        return size

    def _node_min(self, node: Node, size: list[int]) -> int:
        k = node.kind
        if k == "alias":
            return size[node.value]
        if k == "string":
            return 2 + node.lo
        if k == "number":
            if node.lo is None and node.hi is None:
                return 1
            firsts = [c for ch in "-0123456789" if (c := _dec_close(ch, node.lo, node.hi, *node.strict)) is not None]
            return 1 + min(firsts) if firsts else INF
        if k == "integer":
            lo, hi = node.lo, node.hi
            if (lo is None or lo <= 0) and (hi is None or hi >= 0):
                return 1
            return len(str(lo)) if lo is not None and lo > 0 else len(str(hi))
        if k == "literal":
            return min(len(o) for o in node.options)
        if k == "union":
            return min(size[a] for a in node.alts)
        if k == "free_object":
            return 2
        if k == "array":
            return 2 if node.lo == 0 else 2 + node.lo * size[node.value] + node.lo - 1
        req = [len(key) + 1 + size[v] for key, v, r in node.props if r]  # object
        return 2 + sum(req) + max(len(req) - 1, 0)

    def _derive(self) -> None:
        """Per-node tables the steps read: literal prefixes, object candidate/closing costs."""
        for node in self.nodes:
            if node.kind == "literal":
                for o in node.options:
                    for n in range(len(o) + 1):
                        node.prefixes[o[:n]] = min(node.prefixes.get(o[:n], INF), len(o) - n)
            elif node.kind == "object":
                P = len(node.props)
                node.cost = [len(key) + 1 + self.min_size[v] for key, v, _ in node.props]
                node.first_req, node.rest = [P] * (P + 1), [1] * (P + 1)
                for j in range(P - 1, -1, -1):
                    node.first_req[j] = j if node.props[j][2] else node.first_req[j + 1]
                    node.rest[j] = node.rest[j + 1] + ((1 + node.cost[j]) if node.props[j][2] else 0)

    # ---- one frame ----
    def _start(self, nid: int, b: int) -> list[tuple]:
        """The frames of a value of node nid that begins with byte b."""
        node = self.nodes[nid]
        k = node.kind
        if k == "alias":
            return self._start(node.value, b)
        if k == "union":
            return [r for a in node.alts for r in self._start(a, b)]
        if k == "string":
            return [(("S", nid, 0, 0, 0),)] if b == QUOTE else []
        if k == "object":
            return [(("O", nid, OPEN, 0, b""),)] if b == LBRACE else []
        if k == "free_object":
            return [(("F", nid, OPEN),)] if b == LBRACE else []
        if k == "array":
            return [(("A", nid, OPEN, 0),)] if b == LBRACKET else []
        if k == "literal":
            return self._step_literal(nid, b"", b)
        bounded = k in ("integer", "number") and (node.lo is not None or node.hi is not None)
        if b == MINUS:
            if bounded and _bounded_close(node, "-") is None:
                return []
            return [(("N", nid, N_SIGN, "-" if bounded else 0),)]
        if b in DIGITS:
            if bounded and _bounded_close(node, chr(b)) is None:
                return []
            return [(("N", nid, N_ZERO if b == 0x30 else N_INT, chr(b) if bounded else 1),)]
        return []

    def _step(self, f: tuple, b: int) -> list[tuple]:
        kind = f[0]
        if kind == "S":
            return self._step_string(f, b)
        if kind == "O":
            return self._step_object(f, b)
        if kind == "A":
            return self._step_array(f, b)
        if kind == "F":
            return self._step_free(f, b)
        if kind == "N":
            return self._step_number(f, b)
        if kind == "L":
            return self._step_literal(f[1], f[2], b)
        return self._start(f[1], b)  # 'R': the document's first byte

    def _step_string(self, f: tuple, b: int) -> list[tuple]:
        _, nid, esc, u, n = f
        if esc:
            nxt = ESCAPE[esc].get(b)
            return [] if nxt is None else [(("S", nid, nxt, 0, n),)]
        if u:
            lo, hi, nxt = UTF8_CONT[u]
            return [(("S", nid, 0, nxt, n),)] if lo <= b <= hi else []
        node = self.nodes[nid]
        if b == QUOTE:
            return [()] if n >= node.lo else []
        if b < 0x20 or (node.hi is not None and n >= node.hi):
            return []
        n2 = n + 1 if node.hi is not None or n < node.lo else n  # counted only as far as a bound needs
        if b == BACKSLASH:
            return [(("S", nid, 1, 0, n2),)]
        if b < 0x80:
            return [(("S", nid, 0, 0, n2),)]
        lead = UTF8_LEAD.get(b)
        return [] if lead is None else [(("S", nid, 0, lead, n2),)]

    def _step_number(self, f: tuple, b: int) -> list[tuple]:
        """JSON's number grammar, -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?, with each
        digit run capped (MAX_INT_DIGITS, MAX_FRAC_DIGITS, MAX_EXP_DIGITS) so that every number
        parses to a finite float or an int Python accepts; integers have neither fraction nor
        exponent, nor "-0". aux: the digits of the current run, or for a bounded integer its text
        so far (each digit must leave a completion inside [minimum, maximum])."""
        _, nid, phase, aux = f
        node = self.nodes[nid]
        is_int = node.kind == "integer"
        if b in DIGITS:
            if phase == N_SIGN:
                if is_int and b == 0x30:
                    return []
                nxt, run = (N_ZERO if b == 0x30 else N_INT), 1
            elif phase == N_INT:
                nxt, run = N_INT, (len(aux) - aux.startswith("-") if isinstance(aux, str) else aux) + 1
                if run > MAX_INT_DIGITS:
                    return []
            elif phase in (N_DOT, N_FRAC):
                frac = len(aux.partition(".")[2]) if isinstance(aux, str) else aux
                nxt, run = N_FRAC, (frac + 1 if phase == N_FRAC else 1)
                if run > MAX_FRAC_DIGITS:
                    return []
            elif phase in (N_EXP_MARK, N_EXP_SIGN, N_EXP):
                run = aux + 1 if phase == N_EXP else 1
                return [(("N", nid, N_EXP, run),)] if run <= MAX_EXP_DIGITS else []
            else:
                return []
            if isinstance(aux, str):  # bounded: the text so far must still reach the range
                text = aux + chr(b)
                return [(("N", nid, nxt, text),)] if _bounded_close(node, text) is not None else []
            return [(("N", nid, nxt, run),)]
        if is_int:
            return []
        if b == 0x2E and phase in (N_ZERO, N_INT):
            if isinstance(aux, str):
                text = aux + "."
                return [(("N", nid, N_DOT, text),)] if _bounded_close(node, text) is not None else []
            return [(("N", nid, N_DOT, 0),)]
        if isinstance(aux, str):  # bounded numbers have no exponent
            return []
        if b in (0x65, 0x45) and phase in (N_ZERO, N_INT, N_FRAC):
            return [(("N", nid, N_EXP_MARK, 0),)]
        if b in (0x2B, 0x2D) and phase == N_EXP_MARK:
            return [(("N", nid, N_EXP_SIGN, 0),)]
        return []

    def _step_literal(self, nid: int, prefix: bytes, b: int) -> list[tuple]:
        node = self.nodes[nid]
        p = prefix + bytes((b,))
        if p not in node.prefixes:
            return []
        if p in node.options and not any(len(o) > len(p) and o.startswith(p) for o in node.options):
            return [()]
        return [(("L", nid, p),)]

    def _step_object(self, f: tuple, b: int) -> list[tuple]:
        _, nid, phase, i, prefix = f
        node = self.nodes[nid]
        P = len(node.props)
        if phase in (OPEN, AFTER_COMMA, AFTER_COMMA_SP):
            if phase == AFTER_COMMA and b == SPACE:
                return [(("O", nid, AFTER_COMMA_SP, i, b""),)]
            if b == QUOTE and i < P:
                return [(("O", nid, KEY, i, b'"'),)]
            return [()] if phase == OPEN and b == RBRACE and node.first_req[0] == P else []
        if phase == KEY:
            p = prefix + bytes((b,))
            last = min(node.first_req[i], P - 1)
            matches = [j for j in range(i, last + 1) if node.props[j][0].startswith(p)]
            if not matches:
                return []
            if len(matches) == 1 and node.props[matches[0]][0] == p:
                return [(("O", nid, COLON_NEXT, matches[0], b""),)]
            return [(("O", nid, KEY, i, p),)]
        if phase == COLON_NEXT:
            return [(("O", nid, AFTER_COLON, i, b""),)] if b == COLON else []
        if phase in (AFTER_COLON, AFTER_COLON_SP):
            if phase == AFTER_COLON and b == SPACE:
                return [(("O", nid, AFTER_COLON_SP, i, b""),)]
            parent = ("O", nid, VALUE, i, b"")
            return [(parent,) + r for r in self._start(node.props[i][1], b)]
        if b == COMMA and i + 1 < P:  # VALUE: property i is done
            return [(("O", nid, AFTER_COMMA, i + 1, b""),)]
        return [()] if b == RBRACE and node.first_req[i + 1] == P else []

    def _step_free(self, f: tuple, b: int) -> list[tuple]:
        _, nid, phase = f
        node = self.nodes[nid]
        key = ("S", self.free_key, 0, 0, 0)  # a free object's key: an unbounded string
        if phase in (OPEN, AFTER_COMMA, AFTER_COMMA_SP):
            if phase == AFTER_COMMA and b == SPACE:
                return [(("F", nid, AFTER_COMMA_SP),)]
            if b == QUOTE:
                return [(("F", nid, KEY), key)]
            return [()] if phase == OPEN and b == RBRACE else []
        if phase == KEY:
            return [(("F", nid, AFTER_COLON),)] if b == COLON else []
        if phase in (AFTER_COLON, AFTER_COLON_SP):
            if phase == AFTER_COLON and b == SPACE:
                return [(("F", nid, AFTER_COLON_SP),)]
            return [(("F", nid, VALUE),) + r for r in self._start(node.value, b)]
        if b == COMMA:  # VALUE
            return [(("F", nid, AFTER_COMMA),)]
        return [()] if b == RBRACE else []

    def _step_array(self, f: tuple, b: int) -> list[tuple]:
        _, nid, phase, count = f
        node = self.nodes[nid]
        if phase == OPEN:
            if b == RBRACKET and node.lo == 0:
                return [()]
            if node.hi == 0:
                return []
            return [(("A", nid, VALUE, self._count(node, 1)),) + r for r in self._start(node.value, b)]
        if phase == VALUE:
            if b == COMMA and (node.hi is None or count < node.hi):
                return [(("A", nid, AFTER_COMMA, count),)]
            return [()] if b == RBRACKET and count >= node.lo else []
        if phase == AFTER_COMMA and b == SPACE:
            return [(("A", nid, AFTER_COMMA_SP, count),)]
        parent = ("A", nid, VALUE, self._count(node, count + 1))
        return [(parent,) + r for r in self._start(node.value, b)]

    @staticmethod
    def _count(node: Node, c: int) -> int:
        """Items are counted only as far as a bound needs (so unbounded arrays reuse states)."""
        return c if node.hi is not None else min(c, node.lo)

    def _can_end(self, f: tuple) -> bool:
        if f[0] == "N":
            _, nid, phase, text = f
            if phase not in (N_ZERO, N_INT, N_FRAC, N_EXP):
                return False
            node = self.nodes[nid]
            return not isinstance(text, str) or _bounded_close(node, text) == 0
        if f[0] == "L":
            return f[2] in self.nodes[f[1]].options
        return False

    def _frame_close(self, f: tuple) -> int:
        """Fewest bytes that finish frame f's value (its parents not counted)."""
        c = self._close.get(f)
        if c is None:
            if len(self._close) > 200_000:
                self._close.clear()
            c = self._close[f] = min(self._frame_close_uncached(f), INF)
        return c

    def _frame_close_uncached(self, f: tuple) -> int:
        kind, nid = f[0], f[1]
        node = self.nodes[nid]
        ms = self.min_size
        if kind == "R":
            return ms[nid]
        if kind == "S":
            _, _, esc, u, n = f
            return 1 + ESCAPE_CLOSE[esc] + UTF8_PENDING[u] + max(node.lo - n, 0)
        if kind == "N":
            _, _, phase, text = f
            if isinstance(text, str):  # bounded
                c = _bounded_close(node, text)
                return INF if c is None else c
            return 1 if phase in (N_SIGN, N_DOT, N_EXP_MARK, N_EXP_SIGN) else 0
        if kind == "L":
            return node.prefixes[f[2]]
        if kind == "A":
            _, _, phase, count = f
            item, lo = ms[node.value], node.lo
            if phase == OPEN:
                return 1 if lo == 0 else lo * item + lo
            if phase == VALUE:
                return max(lo - count, 0) * (1 + item) + 1
            return item + max(lo - count - 1, 0) * (1 + item) + 1
        if kind == "F":
            phase, item = f[2], ms[node.value]
            return {OPEN: 1, KEY: 2 + item, AFTER_COLON: item + 1, AFTER_COLON_SP: item + 1, VALUE: 1}.get(phase, 4 + item)
        return self._object_close(node, f[2], f[3], f[4])

    def _object_close(self, node: Node, phase: int, i: int, prefix: bytes) -> int:
        P = len(node.props)
        if phase == OPEN and node.first_req[0] == P:
            return 1
        if phase == VALUE:
            return node.rest[i + 1]
        if phase == COLON_NEXT:
            return 1 + self.min_size[node.props[i][1]] + node.rest[i + 1]
        if phase in (AFTER_COLON, AFTER_COLON_SP):
            return self.min_size[node.props[i][1]] + node.rest[i + 1]
        last = min(node.first_req[i], P - 1)  # OPEN, AFTER_COMMA(_SP), KEY: the candidates i..last
        best = INF
        for j in range(i, last + 1):
            key = node.props[j][0]
            if key.startswith(prefix):
                best = min(best, node.cost[j] - len(prefix) + node.rest[j + 1])
        return best

    # ---- threads and states ----
    def initial(self) -> frozenset:
        return frozenset({(("R", self.root),)})

    def advance(self, state: frozenset, b: int) -> frozenset:
        """The state after byte b (empty: b is not allowed)."""
        key = (state, b)
        out = self._trans.get(key)
        if out is None:
            threads: set = set()
            for thread in state:
                if thread:
                    self._advance_thread(thread, b, threads)
            out = frozenset(threads)
            if len(self._trans) > 200_000:
                self._trans.clear()
            self._trans[key] = out
        return out

    def _advance_thread(self, thread: tuple, b: int, out: set) -> None:
        top, below = thread[-1], thread[:-1]
        for rep in self._step(top, b):
            out.add(below + rep)
        if below and self._can_end(top):  # the value may end here: its parent takes the byte
            self._advance_thread(below, b, out)

    def close(self, state: frozenset) -> int:
        """Fewest bytes from this state to a complete document (cached: a frozenset keeps its hash)."""
        c = self._state_close.get(state)
        if c is None:
            if len(self._state_close) > 200_000:
                self._state_close.clear()
            c = self._state_close[state] = min((self.thread_close(t) for t in state), default=INF)
        return c

    def thread_close(self, thread: tuple) -> int:
        return min(sum(self._frame_close(f) for f in thread), INF)

    def complete(self, state: frozenset) -> bool:
        return any(not t or (len(t) == 1 and self._can_end(t[0])) for t in state)


def _resolve_aliases(nodes: list[Node]) -> list[Node]:
    """Check that every $ref alias reaches a real node (a $ref chain that loops is an error)."""
    for i, node in enumerate(nodes):
        seen = set()
        j = i
        while nodes[j].kind == "alias":
            if j in seen:
                raise _schema_error("", "a $ref refers to itself without any schema in between")
            seen.add(j)
            j = nodes[j].value
    return nodes


def compile_schema(schema: dict | None) -> Grammar:
    """The automaton of a schema; None = json_object (any JSON object). ValueError naming the
    keyword for what is not supported, or when no finite value satisfies the schema."""
    root_schema = {"type": "object"} if schema is None else schema
    compiler = _Compiler(root_schema)
    root, _ = compiler.compile(root_schema)
    grammar = Grammar(compiler.nodes, root, compiler.free_key)
    if grammar.root_min >= INF:
        raise _schema_error("", "no finite JSON value satisfies this schema (a required recursion never ends)")
    return grammar

