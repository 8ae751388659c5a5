"""THE parser of integer-list flags, for ``pretrain_moe.py`` and the tools alike, and the
divisors that the one-line errors list as valid sizes.

``--num-experts 4 8`` (space-separated, as Megatron-DeepSpeed users write it), ``--num-experts
4,8`` (comma-separated), a mix of both, and ``[4,8]`` all give ``[4, 8]``; ``--num-experts 4``
gives ``[4]``.  It depends on nothing else in megamoe, so that ``training`` and the tools (which
use ``checkpointing``, never ``training``) can share it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n`` in increasing order (the valid sizes an error names)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_int_list(tokens: str | Sequence[str], *, minimum: int | None = None) -> list[int]:
    """The integers of ``tokens`` (one string or several), each split at commas, in order.

    Raises ``ValueError`` saying what is wrong (not an integer, empty, below ``minimum``)."""
    text = [tokens] if isinstance(tokens, str) else list(tokens)
    values = []
    for token in text:
        for piece in token.strip().removeprefix("[").removesuffix("]").split(","):
            try:
                values.append(int(piece))
            except ValueError:
                raise ValueError(f"expected integers separated by spaces or commas, got {' '.join(text)!r}") from None
    if minimum is not None and any(v < minimum for v in values):
        raise ValueError(f"values must be >= {minimum}, got {' '.join(text)!r}")
    return values


class IntListAction(argparse.Action):
    """``parser.add_argument(flag, action=IntListAction, minimum=...)``: one or more tokens
    (``nargs="+"``) stored as ``parse_int_list`` of them; a bad value is argparse's usage error
    naming the flag."""

    def __init__(self, option_strings, dest, *, minimum: int | None = None, **kwargs) -> None:
        kwargs.setdefault("metavar", "N")
        super().__init__(option_strings, dest, nargs="+", **kwargs)
        self.minimum = minimum

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            setattr(namespace, self.dest, parse_int_list(values, minimum=self.minimum))
        except ValueError as err:
            raise argparse.ArgumentError(self, str(err)) from None
