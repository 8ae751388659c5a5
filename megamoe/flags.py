"""Command-line flags declared beside the config dataclass fields they set.

Every field of a config dataclass is declared with ``flag(...)`` (a Megatron flag sets it: name,
help text, choices and check sit beside the default) or ``derived(...)`` (no flag of its own:
``parse_config`` computes it from other flags, or a library caller sets it).  A plain field is
an error when the parser is built, so a field can never silently miss its flag.

    @dataclass
    class ScheduleConfig:
        lr_decay_style: str = flag("cosine", help="decay after warmup", choices=("linear", "cosine"))
        warmup: int = flag(0, name="--lr-warmup-iters", help="linear warmup", check=non_negative)
        decay_iters: int = derived(0, help="from --train-iters")

        def __post_init__(self):
            check_fields(self)   # choices and checks, one ValueError naming the flag

``add_flags(parser, ScheduleConfig, "schedule")`` adds one argparse group with every default
and the choices in ``--help``; ``from_args(ScheduleConfig, args, decay_iters=...)`` builds the
dataclass from the parsed flags plus the derived values.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

_FLAG = "megamoe.flag"
_DERIVED = "megamoe.derived"

Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one dataclass field appears on the command line."""

    help: str
    name: str | None = None  # default: --field-name
    choices: tuple | None = None
    check: Check | None = None  # value -> None, or what is wrong ("must be > 0")
    type: Callable[[str], Any] | None = None  # default: from the field's annotation
    action: type[argparse.Action] | None = None  # instead of type (e.g. megamoe.int_list.IntListAction)
    nargs: str | None = None
    default_text: str | None = None  # shown instead of the default value (e.g. "--seq-length")
    metavar: str | None = None


def flag(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
         **options: Any) -> Any:
    """A dataclass field set by a command-line flag; see ``Flag`` for ``options``.

    A ``bool`` field that defaults to False is a ``store_true`` flag; one that defaults to True
    needs a negating ``name`` (``--disable-bias-linear``) and is ``store_false``.
    """
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_FLAG: Flag(help=help, **options)})


def derived(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            init: bool = True) -> Any:
    """A dataclass field with no flag of its own: computed from other flags, or set in code."""
    return dataclasses.field(default=default, default_factory=default_factory, init=init, repr=init,
                             metadata={_DERIVED: help})


# ---------------------------------------------------------------- checks: value -> problem or None
def positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def at_least_one(value) -> str | None:
    return None if value >= 1 else "must be >= 1"


def probability(value) -> str | None:
    """In [0, 1): a dropout rate or an Adam beta."""
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


# ---------------------------------------------------------------- reading the declarations
def flag_of(f: dataclasses.Field) -> Flag | None:
    return f.metadata.get(_FLAG)


def is_derived(f: dataclasses.Field) -> bool:
    return _DERIVED in f.metadata


def flag_name(f: dataclasses.Field) -> str:
    spec = flag_of(f)
    return (spec and spec.name) or "--" + f.name.replace("_", "-")


def check_fields(obj) -> None:
    """Raise ``ValueError`` naming the flag if a field's value is not one of its choices or fails
    its check.  ``None`` (an optional flag left unset) is not checked."""
    for f in dataclasses.fields(obj):
        spec = flag_of(f)
        value = getattr(obj, f.name)
        if spec is None or value is None:
            continue
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"{flag_name(f)} {value!r}: valid values are {list(spec.choices)}")
        problem = spec.check(value) if spec.check else None
        if problem:
            raise ValueError(f"{flag_name(f)} {problem}, got {value}")


def _value_type(cls, f: dataclasses.Field) -> Callable[[str], Any]:
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = options[0] if len(options) == 1 else hint
    if typing.get_origin(hint) is list and f.metadata[_FLAG].nargs:
        hint = typing.get_args(hint)[0]
    if hint in (int, float, str):
        return hint
    raise TypeError(f"{cls.__name__}.{f.name}: annotation {hint} needs an explicit type= in its flag()")


def _default_text(f: dataclasses.Field, spec: Flag) -> str:
    if spec.default_text is not None:
        return spec.default_text
    default = _default(f)
    if default is None:
        return "unset"
    if isinstance(default, (list, tuple)):
        return ",".join(str(v) for v in default) or "none"
    return str(default)


def _dest(f: dataclasses.Field) -> str:
    return flag_name(f).lstrip("-").replace("-", "_")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def add_flags(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """Add one argument group with a flag per field of ``cls``.  The parsed value sits under the
    flag's own name (``args.disable_bias_linear``), as the user typed it; ``from_args`` maps it
    to the field."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        spec = flag_of(f)
        if spec is None:
            if not is_derived(f):
                raise TypeError(f"{cls.__name__}.{f.name} is neither flag() nor derived()")
            continue
        name, default = flag_name(f), _default(f)
        if isinstance(default, bool):
            if default and _dest(f) == f.name:
                raise TypeError(f"{cls.__name__}.{f.name} defaults to True: give its flag a negating name")
            group.add_argument(name, action="store_true", help=f"{spec.help} (default: off)")
            continue
        help_ = f"{spec.help} (default: {_default_text(f, spec)})".replace("%", "%%")
        if spec.action is not None:
            group.add_argument(name, default=default, action=spec.action, help=help_)
            continue
        metavar = spec.metavar or ("{" + ",".join(str(c) for c in spec.choices) + "}" if spec.choices
                                   else name.lstrip("-").upper().replace("-", "_"))
        group.add_argument(
            name, default=default, type=spec.type or _value_type(cls, f), nargs=spec.nargs, metavar=metavar,
            help=help_,
        )


def from_args(cls, args: argparse.Namespace, **derived_values: Any):
    """``cls`` with each flag field from ``args`` and ``derived_values`` on top."""
    unknown = set(derived_values) - {f.name for f in dataclasses.fields(cls)}
    assert not unknown, f"{cls.__name__} has no fields {sorted(unknown)}"
    values = {}
    for f in dataclasses.fields(cls):
        if flag_of(f) is not None:
            value = getattr(args, _dest(f))
            values[f.name] = (not value) if _default(f) is True else value  # a negating flag
    return cls(**{**values, **derived_values})


def _typed(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def to_argv(obj, *, exclude: Sequence[str] = ()) -> list[str]:
    """The flags that give ``obj`` (a flag dataclass) its values: those of its flag fields that
    differ from their defaults, except the fields named in ``exclude``; ``from_args`` of them
    parsed gives ``obj`` back (with the same derived values).  Lists print comma-separated."""
    argv = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if flag_of(f) is None or f.name in exclude or value is None or value == _default(f):
            continue
        if isinstance(_default(f), bool):
            argv.append(flag_name(f))  # store_true, or the negating name of a default-True field
        else:
            argv += [flag_name(f), _typed(value)]
    return argv


def set_args_from(obj, args: argparse.Namespace, *, exclude: Sequence[str] = ()) -> None:
    """Put ``obj``'s flag fields into parsed ``args`` as if typed (``exclude``: fields left as given)."""
    for f in dataclasses.fields(obj):
        if flag_of(f) is not None and f.name not in exclude:
            value = getattr(obj, f.name)
            setattr(args, _dest(f), (not value) if _default(f) is True else value)


def flag_fields(classes: Sequence[type]) -> dict[str, str]:
    """``{flag: "Class.field"}`` over ``classes``: what ``--help`` lists, for tests and docs."""
    return {flag_name(f): f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
            if flag_of(f) is not None}

