"""A deterministic JSON instance of a JSON Schema: the simulator's "guided decoding".

vLLM constrains its output to the requested schema; the simulator has no model, so it
builds one valid instance instead, seeded by the conversation: the same request always
gets the same JSON. It covers what pydantic's `model_json_schema()` and the `openai`
SDK's strict conversion emit (docs/simulator.md lists it). Unknown keywords are ignored;
a schema it cannot satisfy still gets JSON (best effort), never an exception. Written
here rather than taken from a library: see docs/choices.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from re import _parser as re_parser  # stdlib's regex parser (private): spells a `pattern`
from typing import Any

SOFT_DEPTH = 4  # from this nesting depth on: null / empty / cheapest choices
HARD_DEPTH = 16  # here it stops (required recursion never ends): {} or [] or null
MAX_ITEMS = 64  # largest array or object built (a bigger `minItems` is not honoured)
MAX_CHARS = 4096  # longest string built
MAX_NODES = 5000  # values built before the cheapest value is answered everywhere
MAX_HOPS = 64  # `$ref` / `anyOf` / `allOf` steps without nesting (A → B → A)

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()
_EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
_KIND_KEYS = (  # a schema without `type`: the kind its keywords imply
    ("object", ("properties", "additionalProperties", "required", "minProperties")),
    ("array", ("items", "prefixItems", "minItems", "maxItems")),
    ("string", ("minLength", "maxLength", "pattern", "format")),
    ("number", ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")),
)
_CHEAP = {"null": 0, "boolean": 1, "integer": 2, "number": 2, "string": 3}  # deep unions
_PY = {"null": type(None), "integer": int, "number": int | float, "string": str}
_PY |= {"boolean": bool, "array": list, "object": dict}


def instance(schema: Any, seed: bytes = b"") -> Any:
    """A JSON value (dicts, lists, str, int, float, bool, None) meant to fit `schema`."""
    try:
        return _Gen(schema if isinstance(schema, dict) else {}, seed).value(schema, "$", 0)
    except RecursionError:  # a pathological schema: still answer JSON
        return None


def dumps(schema: Any, seed: bytes = b"") -> str:
    """`instance` as compact JSON text (stdlib json: integers beyond 64 bits too)."""
    try:
        return json.dumps(instance(schema, seed), ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return "{}"


class _Gen:
    """One generation: the root (for `$ref`), the seed of every choice, a size budget."""

    def __init__(self, root: dict[str, Any], seed: bytes) -> None:
        self.root, self.seed, self.budget = root, seed, MAX_NODES

    def h(self, path: str) -> int:
        """A 64-bit number for one place in the value: varied, reproducible."""
        key = self.seed + path.encode(errors="replace")
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest())

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any] | None:
        """`schema` with its local `$ref` chain followed, siblings kept (None: not found)."""
        for _ in range(MAX_HOPS):
            ref = schema.get("$ref")
            if not isinstance(ref, str):
                return schema
            if ref != "#" and not ref.startswith("#/"):
                return None  # remote references and anchors are not followed
            target: Any = self.root
            for part in ref[1:].split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                return None
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return None

    def merge_all_of(self, schema: dict[str, Any], hops: int = 0) -> dict[str, Any]:
        """`allOf` folded into one schema: properties merged, `required` joined."""
        out = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"] if isinstance(schema["allOf"], list) else ():
            part = self.resolve(part) if isinstance(part, dict) and hops < MAX_HOPS else None
            part = self.merge_all_of(part, hops + 1) if part and "allOf" in part else part
            for key, value in (part or {}).items():
                mine = out.get(key)
                if key == "properties" and isinstance(value, dict) and isinstance(mine, dict):
                    out[key] = {**mine, **value}
                elif key == "required" and isinstance(value, list) and isinstance(mine, list):
                    out[key] = mine + [r for r in value if r not in mine]
                else:
                    out.setdefault(key, value)
        return out

    def value(self, schema: Any, path: str, depth: int, hops: int = 0) -> Any:
        """The value for `schema` at `path`, `depth` containers down."""
        self.budget -= 1
        resolved = self.resolve(schema) if isinstance(schema, dict) and hops < MAX_HOPS else None
        if resolved is None:
            return None  # `true` (anything), `false` (nothing fits), a lost `$ref`: null
        schema = self.merge_all_of(resolved) if "allOf" in resolved else resolved
        enum = schema.get("enum")
        if "const" in schema or (isinstance(enum, list) and enum):
            return schema["const"] if "const" in schema else enum[self.h(path) % len(enum)]
        if "default" in schema and _fits_kind(schema["default"], schema.get("type")):
            return schema["default"]
        branches = schema.get("anyOf", schema.get("oneOf"))
        if isinstance(branches, list):
            rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
            return self.value({**rest, **self.branch(branches, path, depth)}, path, depth, hops + 1)
        kind = self.kind(schema, depth)
        if depth >= HARD_DEPTH or self.budget <= 0:
            return {"object": {}, "array": []}.get(kind or "")
        if kind == "object":
            return self.obj(schema, path, depth)
        if kind == "array":
            return self.array(schema, path, depth)
        if kind == "string":
            return self.string(schema, path)
        if kind in ("integer", "number"):
            return self.number(schema, path, kind == "integer")
        return bool(self.h(path) & 1) if kind == "boolean" else None

    def branch(self, branches: list[Any], path: str, depth: int) -> dict[str, Any]:
        """Shallow: a non-null branch (the value filled in); deep: the cheapest type."""
        found = [r for b in branches if isinstance(b, dict) and (r := self.resolve(b)) is not None]
        if depth >= SOFT_DEPTH:
            return min(found, key=lambda b: _CHEAP.get(_type_of(b) or "", 9), default={})
        full = [b for b in found if _type_of(b) != "null"] or found or [{}]
        return full[self.h(path + "|") % len(full)]

    def kind(self, schema: dict[str, Any], depth: int) -> str | None:
        """The JSON type to build: `type` (a list picks one), else one its keywords imply."""
        kind = schema.get("type")
        if isinstance(kind, list):
            names = [k for k in kind if isinstance(k, str)]
            if "null" in names and (depth >= SOFT_DEPTH or len(names) == 1):
                return "null"
            kind = next((k for k in names if k != "null"), None)
        if isinstance(kind, str):
            return kind
        return next((k for k, keys in _KIND_KEYS if any(key in schema for key in keys)), None)

    def obj(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        """Every property when shallow, the required ones when deep; `minProperties`."""
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [r for r in schema.get("required") or () if isinstance(r, str)]
        extra = schema.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else None if extra is False else {}
        out = {
            name: self.value(sub, f"{path}.{name}", depth + 1)
            for name, sub in props.items()
            if name in required or depth < SOFT_DEPTH
        }
        for name in (r for r in required if r not in out):
            out[name] = self.value(extra or {}, f"{path}.{name}", depth + 1)
        want = min(_int(schema.get("minProperties"), 0), MAX_ITEMS)
        if extra and not props and depth < SOFT_DEPTH:
            want = max(want, 1)  # a `dict[str, X]` gets one entry
        for i in range(2 * MAX_ITEMS if extra is not None and len(out) < want else 0):
            name = _WORDS[(self.h(path) + i) % len(_WORDS)] + (str(i) if i >= len(_WORDS) else "")
            if name not in out:
                out[name] = self.value(extra, f"{path}.{name}", depth + 1)
            if len(out) >= want:
                break
        return out

    def array(self, schema: dict[str, Any], path: str, depth: int) -> list[Any]:
        """`prefixItems` then `items`: one item when shallow, else `minItems`, ≤ `maxItems`."""
        items = schema.get("items")  # a list: draft 4-7 tuples, the rest `additionalItems`
        prefix = schema.get("prefixItems", items if isinstance(items, list) else None)
        prefix = prefix if isinstance(prefix, list) else []
        items = schema.get("additionalItems") if isinstance(items, list) else items
        lo = max(_int(schema.get("minItems"), 0), len(prefix))
        lo = lo or int(depth < SOFT_DEPTH and isinstance(items, dict))
        n = min(lo, _int(schema.get("maxItems"), MAX_ITEMS), MAX_ITEMS)
        unique = schema.get("uniqueItems") is True
        out: list[Any] = []
        for i in range(n * (8 if unique else 1)):  # unique: a few more tries for new values
            sub = prefix[len(out)] if len(out) < len(prefix) else items
            value = self.value(sub, f"{path}[{i}]", depth + 1)
            if not unique or value not in out:
                out.append(value)
            if len(out) >= n:
                break
        return out

    def string(self, schema: dict[str, Any], path: str) -> str:
        """A `format` example or a word, made to match `pattern`, padded/cut to length."""
        text = _formatted(schema.get("format"), self.h(path))
        if isinstance(schema.get("pattern"), str):
            text = _matching(schema["pattern"], text)
        text += "x" * (min(_int(schema.get("minLength"), 0), MAX_CHARS) - len(text))
        self.budget -= len(text) // 64  # long strings count against the size budget
        return text[: _int(schema.get("maxLength"), MAX_CHARS)]

    def number(self, schema: dict[str, Any], path: str, integer: bool) -> int | float:
        """A value inside the bounds (exclusive ones too), a multiple of `multipleOf`."""
        h = self.h(path)
        lo, lo_open = _bound(schema, "minimum", "exclusiveMinimum", max)
        hi, hi_open = _bound(schema, "maximum", "exclusiveMaximum", min)

        def fits(v: float) -> bool:
            above = lo is None or v > lo or (v == lo and not lo_open)
            return above and (hi is None or v < hi or (v == hi and not hi_open))

        step = _num(schema.get("multipleOf"))
        try:
            if step is not None and step > 0:
                base = lo if lo is not None else hi - 100 * step if hi is not None else h % 100
                for k in range(math.ceil(base / step), math.ceil(base / step) + 64):
                    v = k * step
                    if fits(v) and (v / step).is_integer() and (not integer or v == int(v)):
                        return int(v) if integer else v
            if integer:
                ilo = None if lo is None else math.floor(lo) + 1 if lo_open else math.ceil(lo)
                ihi = None if hi is None else math.ceil(hi) - 1 if hi_open else math.floor(hi)
                if ilo is not None and ihi is not None:
                    return ilo + h % (ihi - ilo + 1) if ihi >= ilo else ilo
                if ilo is not None or ihi is not None:
                    return ilo + h % 100 if ilo is not None else ihi - h % 100
                return h % 100
            value = (h % 1000) / 10
            if lo is not None and hi is not None:
                value = lo + (hi - lo) * ((h % 999) + 1) / 1000 if hi > lo else lo
            elif lo is not None or hi is not None:
                value = lo + 1 + value if lo is not None else hi - 1 - value
            return round(value, 3) if fits(round(value, 3)) else value
        except (OverflowError, ValueError):  # bounds near the float limits
            return 0


def _type_of(schema: dict[str, Any]) -> str | None:
    return schema["type"] if isinstance(schema.get("type"), str) else None


def _fits_kind(value: Any, kind: Any) -> bool:
    """Whether a `default` has the JSON type the schema says (a cheap sanity check)."""
    kinds = kind if isinstance(kind, list) else [kind] if isinstance(kind, str) else None
    if kinds is None or isinstance(value, bool):
        return kinds is None or "boolean" in kinds
    return any(isinstance(value, _PY.get(k, ())) for k in kinds if isinstance(k, str))


def _int(value: Any, fallback: int) -> int:
    number = _num(value)
    return fallback if number is None else max(int(number), 0)


def _num(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return value if ok and math.isfinite(value) else None


def _bound(schema: dict[str, Any], plain: str, exclusive: str, pick: Any) -> tuple[Any, bool]:
    """(bound, open): the tighter of `minimum`/`exclusiveMinimum` (draft 4's bool too)."""
    value, excl = _num(schema.get(plain)), schema.get(exclusive)
    if excl is True:
        return value, value is not None
    excl = _num(excl)
    if excl is None or (value is not None and pick(value, excl) == value and value != excl):
        return value, False
    return excl, True


def _formatted(fmt: Any, h: int) -> str:
    """A valid example of a string `format`; a vocabulary word for any other."""
    word = _WORDS[h % len(_WORDS)]
    when = _EPOCH + timedelta(days=h % 3650, seconds=(h >> 16) % 86400)
    if not isinstance(fmt, str):
        return word
    fmt = {"url": "uri", "iri": "uri", "idn-email": "email", "idn-hostname": "hostname"}.get(
        fmt, fmt
    )
    examples = {
        "date-time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "date": when.strftime("%Y-%m-%d"),
        "time": when.strftime("%H:%M:%SZ"),
        "duration": f"PT{h % 90 + 1}M",
        "email": f"{word}@example.com",
        "hostname": f"{word}.example.com",
        "ipv4": f"192.0.2.{h % 254 + 1}",
        "ipv6": f"2001:db8::{h % 65535 + 1:x}",
        "uri": f"https://example.com/{word}",
        "uri-reference": f"/{word}",
        "uuid": str(uuid.UUID(int=h << 64 | h, version=4)),
    }
    return examples.get(fmt, word)


def _matching(pattern: str, text: str) -> str:
    """`text` if it matches `pattern`, else the shortest string the regex spells."""
    try:
        compiled = re.compile(pattern)
        spelled = _spell(re_parser.parse(pattern), {})
    except Exception:  # a bad pattern, or one the private parser reads differently
        return text
    return next((c for c in (text, spelled, "", "a", "0") if compiled.search(c)), text)


def _spell(items: Any, groups: dict[Any, str]) -> str:
    """The shortest string a parsed regex spells: minimum repeats, first branch."""
    out: list[str] = []
    for op, av in items:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(av))
        elif name in ("ANY", "NOT_LITERAL"):
            out.append("b" if av == ord("a") else "a")
        elif name in ("IN", "CATEGORY"):
            out.append(_in_set(av if name == "IN" else [(op, av)]))
        elif name.endswith("_REPEAT"):
            out.append((_spell(av[2], groups) * min(av[0], MAX_CHARS))[:MAX_CHARS])
        elif name == "SUBPATTERN":
            groups[av[0]] = _spell(av[3], groups)
            out.append(groups[av[0]])
        elif name in ("ATOMIC_GROUP", "BRANCH"):
            out.append(_spell(av if name == "ATOMIC_GROUP" else av[1][0], groups))
        elif name == "GROUPREF":
            out.append(groups.get(av, ""))
    return "".join(out)  # AT, ASSERT, ASSERT_NOT: zero-width, nothing to spell


def _in_set(members: list[tuple[Any, Any]]) -> str:
    """A character of a `[...]` class: its first member, or one a negated class allows."""

    def hit(c: str, op: Any, av: Any) -> bool:
        if str(op) == "CATEGORY":
            cat = str(av).removeprefix("CATEGORY_")
            return cat.startswith("NOT_") != _CLASS[cat.removeprefix("NOT_")](c)
        if str(op) == "RANGE":
            return bool(av[0] <= ord(c) <= av[1])
        return str(op) == "LITERAL" and c == chr(av)

    if members and str(members[0][0]) == "NEGATE":
        return next((c for c in "a0A_ -.@~" if not any(hit(c, *m) for m in members)), "a")
    op, av = members[0] if members else ("LITERAL", ord("a"))
    if str(op) == "CATEGORY":
        return next((c for c in "a0 _-" if hit(c, op, av)), "a")
    return chr(av[0] if str(op) == "RANGE" else av)


_CLASS: dict[str, Callable[[str], bool]] = {
    "DIGIT": str.isdigit,
    "WORD": lambda c: c.isalnum() or c == "_",
    "SPACE": str.isspace,
}
