"""What a pack's JSON may hold: a small declarative schema, checked before anything is trusted.

A pack is untrusted input, and its JSON (the safetensors table and the kvpack header)
is the part an attacker edits most easily: checksums only prove that the bytes were not
corrupted, not that a person did not rewrite them. Everything the reader uses from the
JSON is therefore described here once, as data, with types, ranges, string sizes and
list lengths; :func:`check` walks a value against its description and names the first
field that does not fit. Cross-field rules (counts against tensors, segments against the
manifest) live with the reader in ``pack.py``; docs/kvpack-format.md, section 8,
documents both.

Unknown keys are allowed (minor versions add keys) but bounded in depth, so that
nothing a reader ignores can make it recurse.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

INT32_MAX = 2**31 - 1
MAX_BYTES = 2**62  # any byte count or offset; keeps arithmetic on them exact and small
MAX_DEPTH = 32  # nesting of anything a reader ignores
MAX_TENSORS = 1 << 16  # a pack holds a few tensors per layer
MAX_NAME = 4096  # model, recipe, tensor and document names, paths
MAX_TEXT = 1 << 20  # recipe source and task prompt
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_DOCUMENTS = 1 << 24
MAX_HEADS_TOTAL = 1 << 16  # layers x KV heads: 126 x 128 covers the widest models
MAX_ITEMS = 1_000_000  # JSON values any pack may hold, beyond one per 32 bytes of it


class SchemaError(ValueError):
    """A value that does not fit its schema; ``where`` is the field's path (``cache.kept[3][1]``)."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where or 'the document'}: {problem}")
        self.where, self.problem = where, problem


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _join(where: str, key: str | int) -> str:
    return f"{where}[{key}]" if isinstance(key, int) else (f"{where}.{key}" if where else key)


class Spec(ABC):
    """One node of a schema: ``check(value, where)`` returns ``value`` or raises SchemaError."""

    @abstractmethod
    def check(self, value: Any, where: str) -> Any:
        """``value`` if it fits, else SchemaError naming ``where``."""

    def fail(self, value: Any, where: str, expected: str):
        raise SchemaError(where, f"expected {expected}, got {_shown(value)}")


@dataclass(frozen=True)
class Int(Spec):
    lo: int = 0
    hi: int = INT32_MAX

    def check(self, value, where):
        # bool is an int to Python, never to a pack.
        if type(value) is not int or not self.lo <= value <= self.hi:
            self.fail(value, where, f"an integer in [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Number(Spec):
    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value, where):
        if type(value) not in (int, float) or not math.isfinite(value) or not self.lo <= value <= self.hi:
            self.fail(value, where, f"a number in [{self.lo}, {self.hi}]")
        return value


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value, where):
        if type(value) is not bool:
            self.fail(value, where, "true or false")
        return value


@dataclass(frozen=True)
class Null(Spec):
    def check(self, value, where):
        if value is not None:
            self.fail(value, where, "null")
        return value


@dataclass(frozen=True)
class Str(Spec):
    max_len: int = MAX_NAME
    pattern: str | None = None  # the whole string must match
    choices: tuple[str, ...] | None = None

    def check(self, value, where):
        if type(value) is not str:
            self.fail(value, where, "a string")
        if len(value) > self.max_len:
            raise SchemaError(where, f"string of {len(value)} characters, at most {self.max_len} allowed")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SchemaError(where, "string is not valid Unicode (a lone surrogate)") from None
        if self.choices is not None and value not in self.choices:
            self.fail(value, where, "one of " + ", ".join(map(repr, self.choices)))
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            self.fail(value, where, f"a string matching {self.pattern}")
        return value


@dataclass(frozen=True)
class AnyOf(Spec):
    options: tuple[Spec, ...]
    expected: str

    def check(self, value, where):
        for option in self.options:
            try:
                return option.check(value, where)
            except SchemaError:
                pass
        self.fail(value, where, self.expected)


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    max_len: int
    min_len: int = 0

    def check(self, value, where):
        if type(value) is not list:
            self.fail(value, where, "a list")
        if not self.min_len <= len(value) <= self.max_len:
            raise SchemaError(where, f"list of {len(value)} items, expected {self.min_len} to {self.max_len}")
        for i, item in enumerate(value):
            self.item.check(item, _join(where, i))
        return value


@dataclass(frozen=True)
class Grid(Spec):
    """A list of lists whose total size is checked before any item is: ``[rows][cols]``."""

    item: Spec
    max_rows: int
    max_cells: int

    def check(self, value, where):
        if type(value) is not list or not all(type(row) is list for row in value):
            self.fail(value, where, "a list of lists")
        cells = sum(map(len, value))
        if len(value) > self.max_rows or cells > self.max_cells:
            raise SchemaError(where, f"{len(value)} rows of {cells} items in all, at most {self.max_rows} rows "
                                     f"and {self.max_cells} items allowed")
        for i, row in enumerate(value):
            for j, item in enumerate(row):
                self.item.check(item, f"{where}[{i}][{j}]")
        return value


@dataclass(frozen=True)
class Map(Spec):
    """A JSON object with free keys (strings checked by ``key``) and values of one kind."""

    value: Spec
    max_len: int
    key: Str = Str()

    def check(self, value, where):
        if type(value) is not dict:
            self.fail(value, where, "an object")
        if len(value) > self.max_len:
            raise SchemaError(where, f"object of {len(value)} entries, at most {self.max_len} allowed")
        for k, v in value.items():
            self.key.check(k, _join(where, "<key>"))
            self.value.check(v, _join(where, k))
        return value


@dataclass(frozen=True)
class Obj(Spec):
    """A JSON object with known fields. Unknown keys are checked by ``extra`` or, without
    it, only for depth (a newer minor version may add them; readers ignore them)."""

    fields: dict[str, Spec]
    optional: frozenset[str] = field(default_factory=frozenset)
    extra: Spec | None = None

    def check(self, value, where):
        if type(value) is not dict:
            self.fail(value, where, "an object")
        for name, spec in self.fields.items():
            if name in value:
                spec.check(value[name], _join(where, name))
            elif name not in self.optional:
                raise SchemaError(_join(where, name), "missing")
        for name, v in value.items():
            if name not in self.fields:
                if self.extra is not None:
                    self.extra.check(v, _join(where, name))
                else:
                    check_depth(v, _join(where, name))
        return value


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` (iterative: the check itself cannot recurse)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                raise SchemaError(where, f"nested more than {limit} levels deep")
            stack.extend((item, depth + 1) for item in (v.values() if isinstance(v, dict) else v))


def check(spec: Spec, value: Any, where: str = "") -> Any:
    return spec.check(value, where)


def check_items(raw: bytes | bytearray, file_size: int, where: str) -> None:
    """Refuse JSON with more values than a pack of ``file_size`` bytes can need, before parsing.

    Python builds 30-60 bytes of objects per JSON value, from as little as two bytes of
    JSON (``[]``, ``0,``), so the parsed form of a bomb could be 30 times its text. Values
    are counted as the brackets and commas in the raw bytes (an over-count: strings hold
    some). A pack spends far more than 32 bytes of KV on each value its header needs (a
    kept count per layer and head, a few per document), so the bound costs nothing real.
    """
    items = raw.count(b"[") + raw.count(b"{") + raw.count(b",")
    if items > MAX_ITEMS + file_size // 32:
        raise SchemaError(where, f"holds about {items} JSON values, more than a {file_size}-byte pack needs")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse(text: str | bytes, max_objects: int | None = None) -> Any:
    """Strict JSON: no NaN or Infinity, no duplicate keys, bounded nesting, and at most
    ``max_objects`` objects; raises SchemaError on anything else.

    The bounds cost no second pass. Python's parser raises RecursionError on deep
    nesting and ValueError on integers of more than 4300 digits, and the object hook
    stops the parse at the first object too many, before it has read the rest (a
    10^6-entry table is refused after its first 2^16 entries).
    """
    count = 0

    def make_object(pairs: list[tuple[str, Any]]) -> dict:
        nonlocal count
        count += 1
        if max_objects is not None and count > max_objects:
            raise SchemaError("", f"more than {max_objects} objects")
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise SchemaError("", "an object has a duplicate key")
        return obj

    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=make_object)
    except RecursionError:
        raise SchemaError("", "nested too deeply") from None
    except SchemaError:
        raise
    except UnicodeDecodeError:
        raise SchemaError("", "not UTF-8") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, huge integers
        raise SchemaError("", f"not valid JSON ({str(e).splitlines()[0][:80]})") from None


# ----------------------------------------------------------------------------- the pack's JSON

HEX64 = Str(pattern="[0-9a-f]{64}")
TENSOR_NAME = Str(max_len=256, pattern=r"[A-Za-z0-9_.]+")
COUNT = Int()
SCALAR = AnyOf((Int(-INT32_MAX, MAX_BYTES), Number(), Bool(), Null(), Str(max_len=256)),
               "a number, boolean, null or short string")

# The safetensors table (format spec, section 1): one entry per tensor.
TABLE_ENTRY = Obj({
    "dtype": Str(max_len=8),
    "shape": List(Int(0, MAX_BYTES), max_len=8),
    "data_offsets": List(Int(0, MAX_BYTES), min_len=2, max_len=2),
})
METADATA = Map(Str(max_len=100_000_000), max_len=16)

# One part (keys or values) of one layer: its codec, the codec's parameters, its tensors.
PART = Obj({"codec": Str(max_len=64), "tensors": Map(TENSOR_NAME, max_len=16, key=Str(max_len=64))}, extra=SCALAR)

HEADER = Obj({
    "format": Str(max_len=64),
    "version": List(Int(0, 1 << 16), min_len=2, max_len=2),
    "generator": Str(max_len=256),
    "model": Obj({
        "name": Str(),
        "fingerprint": HEX64,
        "architecture": Str(max_len=256),
        "num_layers": Int(1, MAX_LAYERS),
        "num_heads": Int(1, MAX_HEADS * 64),
        "num_kv_heads": Int(1, MAX_HEADS),
        "head_dim": Int(1, MAX_HEAD_DIM),
        "max_positions": Int(1),
        "rope": Bool(),
    }),
    "recipe": Obj({
        "name": Str(max_len=256),
        "source": Str(max_len=MAX_TEXT),
        "task_prompt": Str(max_len=MAX_TEXT),
        "probes": List(Str(max_len=1 << 16), max_len=4096),
        # build --auto-probes: the probes written from the corpus (also in "probes"), by source chunk
        "auto_probes": List(Obj({"question": Str(max_len=1 << 16), "document": Str(), "sha256": HEX64,
                                 "key": HEX64}), max_len=4096),
    }, optional=frozenset({"auto_probes"})),
    "options": Obj({
        "ratio": AnyOf((Number(0, 1), Null()), "a number in [0, 1] or null"),
        "budget": AnyOf((Int(1), Null()), "a positive integer or null"),
        "chunk_size": Int(1),
        "sinks": Int(),
        "scorer": Obj({"name": Str(max_len=64)}, extra=SCALAR),
        "selection": Obj({}, extra=SCALAR),
        "context": Str(choices=("chained", "independent", "whole")),
        "codec": Obj({"name": Str(max_len=64)}, extra=SCALAR),
        "auto_probes": Int(1, 4096),  # build --auto-probes N
        "quant": Obj({"name": Str(max_len=64)}, extra=SCALAR),  # build --quant (format 1.2), when not none
        "stream": Bool(),  # build --stream (format 1.3): compiled at compacted positions
        # build --stream-scorer (format 1.5): the first pass's scorer; "scorer" made the final selection
        "stream_scorer": Obj({"name": Str(max_len=64)}, extra=SCALAR),
    }, optional=frozenset({"auto_probes", "quant", "stream", "stream_scorer"})),
    "framing": Obj({
        "template": Str(choices=("chat", "plain")),
        "prefix_ids": List(Int(), max_len=1 << 20),
        "question_prefix": Str(max_len=1 << 16),
        "question_suffix": Str(max_len=1 << 16),
        "document_header": Str(max_len=1024),
    }, optional=frozenset({"document_header"})),
    "corpus": Obj({
        "documents": Int(1, MAX_DOCUMENTS),
        "tokens": Int(1),
        "manifest": TENSOR_NAME,
        "manifest_sha256": HEX64,
        "manifest_size": Int(2, MAX_BYTES),
        # format 1.3: the segment index (retrieval.py), a tensor like the manifest
        "index": Obj({"tensor": TENSOR_NAME, "sha256": HEX64, "size": Int(2, MAX_BYTES),
                      "retriever": Str(max_len=64), "stopwords": Str(max_len=64)}),
    }, optional=frozenset({"index"})),
    "cache": Obj({
        "tokens": Int(1),
        "question_position": Int(1),
        "kept": Grid(COUNT, max_rows=MAX_LAYERS, max_cells=MAX_HEADS_TOTAL),
        "positions": TENSOR_NAME,
        "layers": List(Obj({"keys": PART, "values": PART}), max_len=MAX_LAYERS),
    }),
    "segments": List(Obj({
        "documents": List(Int(0, MAX_DOCUMENTS), min_len=1, max_len=MAX_DOCUMENTS),
        "tokens": List(Int(), min_len=2, max_len=2),
        "key": HEX64,
        "budget": Int(0),  # tokens kept per KV head (format 1.x before budgets were recorded: absent; 1.4: may be 0)
    }, optional=frozenset({"budget"})), min_len=1, max_len=MAX_DOCUMENTS),
    "checksums": Map(HEX64, max_len=MAX_TENSORS, key=TENSOR_NAME),
    "payload_bytes": Obj({part: Int(0, MAX_BYTES) for part in ("keys", "values", "positions", "manifest", "index")},
                         optional=frozenset({"index"})),
}, optional=frozenset({"generator"}))

# Per segment, its BM25 terms and their counts (format spec, section 5).
INDEX = List(Map(Int(1), max_len=1 << 20, key=Str(max_len=1024)), max_len=MAX_DOCUMENTS)

MANIFEST = List(Obj({
    "path": Str(),
    "sha256": HEX64,
    "tokens": Int(1),
    "segment": Int(0, MAX_DOCUMENTS),
}), min_len=1, max_len=MAX_DOCUMENTS)
