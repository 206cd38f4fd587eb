"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py): value strategies with a dictionary of nasty
inputs, a strategy for any protobuf message built from its descriptor, byte mutations, and a tally of
inputs tried per target (printed, so `pytest -s` shows it).

Budgets come from the hypothesis profiles in tests/conftest.py ("ci" by default, "long" on demand).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import settings
from hypothesis import strategies as st

# Path-like, numeric-looking, control, bidi, combining, astral and oversized strings: the inputs that
# past bugs were made of. "²" passes str.isdigit() and fails int() (issue 22).
NASTY_STRINGS = (
    "", " ", "0", "1", "01", "-1", "+1", "1.5", "1e3", "²", "١٢", "Ⅻ", "NaN", "inf", "null", "true",
    "../x", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", ".", "..", "~", "$HOME", "%s%n", "{}",
    "\x00", "a\x00b", "\n", "\r\n", "\t", "\u202e", "\ufeff", "e\u0301", "😀", "𝔘𝔫𝔦", "中文", "ñ",
    "x" * 256, "x" * 257, "é" * 300, "😀" * 300, "y" * 5000,
)
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

# The only statuses a well-behaved server may answer arbitrary input with. INTERNAL and UNKNOWN mean an
# exception escaped a handler (or the framework), i.e. a bug, and often a traceback logged per request.
ALLOWED_CODES = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
})


def budget(fraction: float = 1.0) -> settings:
    """The loaded profile's settings with `fraction` of its examples (at least 10): expensive targets
    run fewer inputs in CI and proportionally more under --hypothesis-profile=long."""
    return settings(settings.default, max_examples=max(10, int(settings.default.max_examples * fraction)))


# ---------------------------------------------------------------- values

def texts(max_size: int = 40, extra: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(NASTY_STRINGS + extra), st.text(max_size=max_size))


def ints(lo: int, hi: int, extra: tuple[int, ...] = ()) -> st.SearchStrategy[int]:
    edges = tuple(v for v in (lo, hi, lo + 1, hi - 1, 0, 1, -1, 2, 10, 1000, 1001, 10_000, 10_001) + extra
                  if lo <= v <= hi)
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def floats(width: int = 64) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from((0.0, -0.0, 1.0, -1.0, 0.5, 1e-300 if width == 64 else 1e-38, 1e300
                                      if width == 64 else 3e38, float("nan"), float("inf"), float("-inf"))),
                     st.floats(width=width))


def sized_lists(element: st.SearchStrategy, cheap: object, limits: tuple[int, ...] = (),
                max_random: int = 8) -> st.SearchStrategy[list]:
    """Short random lists, or lists of `cheap` copies at sizes around each limit (0, limit, limit + 1)."""
    sizes = sorted({s for lim in limits for s in (lim, lim + 1)})
    around = [st.just(n).map(lambda n: [cheap] * n) for n in sizes]  # st.just(list) would repr 10k elements
    return st.one_of(st.lists(element, max_size=max_random), *around) if around else st.lists(element,
                                                                                              max_size=max_random)


_SCALAR = {
    FieldDescriptor.TYPE_INT32: lambda: ints(*INT32), FieldDescriptor.TYPE_SINT32: lambda: ints(*INT32),
    FieldDescriptor.TYPE_SFIXED32: lambda: ints(*INT32), FieldDescriptor.TYPE_INT64: lambda: ints(*INT64),
    FieldDescriptor.TYPE_SINT64: lambda: ints(*INT64), FieldDescriptor.TYPE_SFIXED64: lambda: ints(*INT64),
    FieldDescriptor.TYPE_UINT32: lambda: ints(*UINT32), FieldDescriptor.TYPE_FIXED32: lambda: ints(*UINT32),
    FieldDescriptor.TYPE_UINT64: lambda: ints(*UINT64), FieldDescriptor.TYPE_FIXED64: lambda: ints(*UINT64),
    FieldDescriptor.TYPE_BOOL: st.booleans, FieldDescriptor.TYPE_FLOAT: lambda: floats(32),
    FieldDescriptor.TYPE_DOUBLE: lambda: floats(64), FieldDescriptor.TYPE_STRING: texts,
    FieldDescriptor.TYPE_BYTES: lambda: st.one_of(st.binary(max_size=64), texts().map(str.encode)),
    FieldDescriptor.TYPE_ENUM: lambda: ints(*INT32),
}


def messages(cls, *, overrides: dict[str, st.SearchStrategy] | None = None, depth: int = 3,
             max_repeated: int = 6) -> st.SearchStrategy:
    """Any instance of protobuf message class `cls`: each field unset or random (scalars from the nasty
    dictionary, repeated fields and maps of several sizes, one member of each oneof, nested messages down
    to `depth`). overrides: field name -> strategy for that field's value (e.g. known ids)."""
    return st.builds(lambda kw: cls(**kw), _fields(cls.DESCRIPTOR, overrides or {}, depth, max_repeated))


def _value(fd: FieldDescriptor, depth: int, max_repeated: int) -> st.SearchStrategy:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        cls = message_factory.GetMessageClass(fd.message_type)
        return st.builds(lambda kw: cls(**kw), _fields(fd.message_type, {}, depth - 1, max_repeated))
    return _SCALAR[fd.type]()


def _fields(desc: Descriptor, overrides: dict, depth: int, max_repeated: int) -> st.SearchStrategy[dict]:
    if depth <= 0:
        return st.just({})
    parts: dict[str, st.SearchStrategy] = {}
    in_oneof = {f.name for o in desc.oneofs for f in o.fields}
    for fd in desc.fields:
        if fd.name in in_oneof:
            continue
        if fd.name in overrides:
            parts[fd.name] = overrides[fd.name]
        elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            k, v = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            parts[fd.name] = st.dictionaries(_value(k, depth, max_repeated), _value(v, depth, max_repeated),
                                             max_size=max_repeated)
        elif fd.is_repeated:
            parts[fd.name] = st.lists(_value(fd, depth, max_repeated), max_size=max_repeated)
        else:
            parts[fd.name] = _value(fd, depth, max_repeated)
    oneofs = [st.one_of(st.just({}), *[_value(f, depth, max_repeated).map(lambda v, n=f.name: {n: v})
                                      for f in o.fields]) for o in desc.oneofs]

    @st.composite
    def build(draw) -> dict:
        kw = {}
        for name, strat in parts.items():
            if draw(st.booleans()):  # unset fields matter as much as set ones
                kw[name] = draw(strat)
        for o in oneofs:
            kw.update(draw(o))
        return kw

    return build()


# ---------------------------------------------------------------- bytes

@st.composite
def mutated(draw, base: bytes, max_ops: int = 4) -> bytes:
    """`base` with 1..max_ops edits: bit flips, byte sets, truncation, insertion, deletion, duplication."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(("flip", "set", "truncate", "insert", "delete", "duplicate")))
        if not data and op != "insert":
            op = "insert"
        if op == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
            continue
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from((0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x22)))
        elif op == "truncate":
            del data[at:]
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            end = min(len(data), at + draw(st.integers(1, 16)))
            data[at:at] = data[at:end]
    return bytes(data)


# ---------------------------------------------------------------- tallies

@dataclass(slots=True)
class Tally:
    """Inputs tried against one target and what came of them; report() prints one line."""
    target: str
    inputs: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)

    def add(self, outcome: str) -> None:
        self.inputs += 1
        self.outcomes[outcome] += 1

    def report(self) -> None:
        detail = ", ".join(f"{k} {n}" for k, n in self.outcomes.most_common())
        print(f"\ninputs tried: {self.target}: {self.inputs} ({detail})")
