"""Command-line flags generated from config dataclasses, so a default and its documentation live in one place.

A field's documentation is its `field(metadata={"doc": ...})`, else its trailing `# comment` and the comment-only
lines below it at a deeper column. Every generated flag has default None ("not given"), so the value a config
gets when a flag is absent is the dataclass's own (or that of the base instance the caller passes); the help
shows the documentation and the dataclass default. Standard library only: contracts/ is the bottom layer.

    FLAGS = flag_set(BatchingConfig, "max_batch", Flag("max_queue", note="then shed"))
    FLAGS.add_to(parser)
    config = config_from_args(FLAGS, parser.parse_args(argv))
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

_SCALARS = (int, float, str, Path)


class FlagValueError(ValueError):
    """A config built from flags failed its validation; the message is the dataclass's (it names the field)."""


@dataclass(frozen=True, slots=True)
class Flag:
    """How one dataclass field appears on the command line. Only `field` is required.

    A bool field becomes `--name` when its default is False, `--name/--no-name` when it is True, and with negate
    a `--name` that sets it to False (`--rollout-follower` for leader).
    """

    field: str
    name: str = ""                                    # without "--"; "": prefix + the field's name, "_" -> "-"
    parse: Callable[[str], Any] | None = None         # argparse `type`; None: from the annotation (int, float,
                                                      # str, Path, each also `| None`); required for other types
    choices: Sequence[Any] | None = None              # allowed values (pass the module's constant, not a copy)
    to_field: Callable[[Any], Any] | None = None      # flag value -> field value (other units, sentinels)
    shown: Callable[[Any], Any] | None = None         # field default -> the default in the flag's units (help)
    negate: bool = False                              # bool field: the flag sets it to False (`--quiet`)
    note: str = ""                                    # appended to the help: flag syntax, sentinels


@dataclass(frozen=True, slots=True)
class _Resolved:
    spec: Flag
    option: str       # "--name"
    dest: str
    kwargs: dict[str, Any]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> documentation: metadata["doc"] when present, else the field's trailing comment."""
    comments = _comment_docs(cls)
    docs = {}
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc") or comments.get(f.name)
        if doc:
            docs[f.name] = doc
    return docs


def _comment_docs(cls: type) -> dict[str, str]:
    """Trailing comments of the class body's `name: type [= value]` lines, joined with the comment-only lines
    that follow at a deeper column than the field's name."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (built at run time, frozen app): metadata docs only
        return {}
    docs: dict[str, list[str]] = {}
    depth, current, current_col, line = 0, None, 0, []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NL and not line:  # blank line or the end of a comment-only line
            continue
        elif tok.type == tokenize.COMMENT and not line:  # a comment-only line: a continuation, or not
            if current is not None and tok.start[1] > current_col:
                docs[current].append(_comment_text(tok.string))
            else:
                current = None
        elif tok.type == tokenize.NEWLINE:  # end of a logical line (a statement)
            current = _field_line(line, depth, docs)
            current_col = line[0].start[1] if current else 0
            line = []
        elif tok.type not in (tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER):
            line.append(tok)
    return {name: " ".join(parts) for name, parts in docs.items() if parts}


def _field_line(line: list[tokenize.TokenInfo], depth: int, docs: dict[str, list[str]]) -> str | None:
    """The field a class-body statement declares when it ends in a comment (recorded into docs), else None."""
    is_field = (depth == 1 and len(line) >= 3 and line[0].type == tokenize.NAME and line[1].string == ":"
                and line[-1].type == tokenize.COMMENT)
    if not is_field:
        return None
    docs[line[0].string] = [_comment_text(line[-1].string)]
    return line[0].string


def _comment_text(comment: str) -> str:
    return comment.lstrip("#").strip()


def _default(cls: type, name: str, defaults: object | None) -> Any:
    if defaults is not None:
        return getattr(defaults, name)
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _scalar_type(annotation: Any) -> Any:
    """int | None -> int; other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


class FlagSet:
    """The flags of some fields of one config dataclass: adds them to a parser, reads them back."""

    def __init__(self, cls: type, specs: Sequence[Flag], *, prefix: str = "", defaults: object | None = None):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        self.cls = cls
        self.defaults = defaults
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        self.flags = tuple(self._resolve(spec, prefix, hints, docs) for spec in specs)

    def _resolve(self, spec: Flag, prefix: str, hints: dict[str, Any], docs: dict[str, str]) -> _Resolved:
        cls_name = self.cls.__name__
        if spec.field not in hints:
            raise ValueError(f"{cls_name} has no field {spec.field!r}")
        if spec.field not in docs and not spec.note:
            raise ValueError(f"{cls_name}.{spec.field} has no documentation to use as its --help: add a trailing "
                             "comment or metadata['doc']")
        name = spec.name or prefix + spec.field.replace("_", "-")
        kind = _scalar_type(hints[spec.field])
        default = _default(self.cls, spec.field, self.defaults)
        kwargs: dict[str, Any] = {"default": None}
        if spec.negate and kind is not bool:
            raise TypeError(f"{cls_name}.{spec.field}: negate is for bool fields, not {kind!r}")
        if kind is bool and spec.parse is None:
            if spec.negate:
                kwargs.update(action="store_const", const=False)
            elif default is True:
                kwargs.update(action=argparse.BooleanOptionalAction)
            else:
                kwargs.update(action="store_const", const=True)
        elif spec.parse is not None or kind in _SCALARS:
            kwargs.update(type=spec.parse or kind, choices=spec.choices)
        else:
            raise TypeError(f"{cls_name}.{spec.field}: annotation {kind!r} needs Flag(parse=...)")
        kwargs["help"] = _help(docs.get(spec.field, ""), spec, default)
        return _Resolved(spec=spec, option=f"--{name}", dest=name.replace("-", "_"), kwargs=kwargs)

    def add_to(self, parser: argparse.ArgumentParser) -> list[argparse.Action]:
        """Adds the flags (to a parser or an argument group); returns their actions (see given_argv)."""
        return [parser.add_argument(f.option, dest=f.dest, **f.kwargs) for f in self.flags]

    def changes(self, args: argparse.Namespace) -> dict[str, Any]:
        """Field -> value for the flags given (not None in args), converted to the field's units."""
        out = {}
        for f in self.flags:
            value = getattr(args, f.dest)
            if value is not None:
                out[f.spec.field] = f.spec.to_field(value) if f.spec.to_field else value
        return out


def _help(doc: str, spec: Flag, default: Any) -> str:
    if spec.negate:  # the flag's name is not the field's: say which field it turns off
        doc = f"{spec.field} = False; {spec.field}: {doc}"
    text = "; ".join(part for part in (doc, spec.note) if part)
    if default is not dataclasses.MISSING:
        text += f" (default: {spec.shown(default) if spec.shown else default})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def flag_set(cls: type, *specs: Flag | str, prefix: str = "", defaults: object | None = None) -> FlagSet:
    """Flags for the given fields of cls (a name stands for Flag(name)); none given: every field.

    defaults: an instance whose values the help shows as the defaults (None: the dataclass's field defaults).
    """
    if not specs:
        specs = tuple(f.name for f in dataclasses.fields(cls))
    return FlagSet(cls, [Flag(s) if isinstance(s, str) else s for s in specs], prefix=prefix, defaults=defaults)


def config_from_args(flags: FlagSet, args: argparse.Namespace, base: object | None = None, **fixed: Any) -> Any:
    """flags.cls from base (None: the dataclass defaults) with the flags that were given and the `fixed` fields.

    Raises FlagValueError (a ValueError; the dataclass's message names the field) when validation fails.
    """
    changes = flags.changes(args)
    try:
        if base is None:
            return flags.cls(**changes, **fixed)
        return dataclasses.replace(base, **changes, **fixed)
    except ValueError as e:
        raise FlagValueError(str(e)) from e


def given_argv(actions: Sequence[argparse.Action], args: argparse.Namespace) -> list[str]:
    """The options among `actions` whose value in args is not their default, as command-line words again: how
    to hand the flags a user gave to a child process that has the same options (`livetower up` -> `train`)."""
    argv: list[str] = []
    for action in actions:
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(action.option_strings[0 if value else 1])
        elif action.nargs == 0:  # store_const / store_true: its presence is the value
            argv.append(action.option_strings[0])
        elif isinstance(value, _SCALARS):
            argv += [action.option_strings[0], str(value)]
        else:
            raise TypeError(f"{action.option_strings[0]}: cannot write {value!r} back as a flag")
    return argv
