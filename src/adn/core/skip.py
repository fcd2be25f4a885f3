"""Skip configurations: which stages of an adaptive depth network skip their skippable blocks.

A configuration is one flag per stage. ``T`` means "skip this stage's skippable part", ``F`` means
"run it". ``FFFF`` is the super-net (nothing skipped); ``TTTT`` is the base-net (everything skippable
skipped). The 2^N configurations of an N-stage network are its sub-networks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

ACCEPTED_FORMS = (
    "a string of T/F, one letter per stage (e.g. 'TTFF'), "
    "a sequence of bools (e.g. [True, True, False, False]), 'super' (nothing skipped) "
    "or 'base' (every skippable part skipped)"
)


class SkipConfig(tuple):
    """An immutable tuple of bools, one per stage; ``True`` skips that stage's skippable part.

    >>> str(SkipConfig("TTFF"))
    'TTFF'
    >>> SkipConfig("base", num_stages=3)
    SkipConfig('TTT')

    ``num_stages`` is required for the ``'super'`` / ``'base'`` forms and, when given, is checked
    against the length of every other form.
    """

    def __new__(cls, value: SkipConfig | str | Sequence[bool], num_stages: int | None = None) -> SkipConfig:
        flags = _parse(value, num_stages)
        return super().__new__(cls, flags)

    @classmethod
    def all(cls, num_stages: int) -> list[SkipConfig]:
        """Every configuration of ``num_stages`` stages: the super-net first, then by number of skipped
        stages (fewest first), the base-net last."""
        if not isinstance(num_stages, int) or num_stages < 0:
            raise ValueError(f"num_stages must be a non-negative integer, got {num_stages!r}")
        configs = [cls(bits) for bits in itertools.product((False, True), repeat=num_stages)]
        return sorted(configs, key=lambda c: (sum(c), tuple(reversed(c))))

    @classmethod
    def super_net(cls, num_stages: int) -> SkipConfig:
        return cls([False] * num_stages)

    @classmethod
    def base_net(cls, num_stages: int) -> SkipConfig:
        return cls([True] * num_stages)

    @property
    def num_stages(self) -> int:
        return len(self)

    @property
    def is_super(self) -> bool:
        return not any(self)

    @property
    def is_base(self) -> bool:
        return all(self)

    @property
    def index(self) -> int:
        """A number in [0, 2**num_stages) unique to this configuration: bit i is stage i's skip flag."""
        return sum(1 << i for i, flag in enumerate(self) if flag)

    def __str__(self) -> str:
        return "".join("T" if flag else "F" for flag in self)

    def __repr__(self) -> str:
        return f"SkipConfig('{self}')"


def _fail(value: object, num_stages: int | None, why: str) -> ValueError:
    stages = f"this network has {num_stages} stages" if num_stages is not None else "stage count not given"
    return ValueError(f"invalid skip configuration {value!r}: {why} ({stages}). Accepted forms: {ACCEPTED_FORMS}.")


def _parse(value: object, num_stages: int | None) -> tuple[bool, ...]:
    if isinstance(value, SkipConfig):
        flags = tuple(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in ("super", "base"):
            if num_stages is None:
                raise _fail(value, num_stages, f"'{text}' needs the number of stages")
            return (text.lower() == "base",) * num_stages
        if not text:
            raise _fail(value, num_stages, "it is empty")
        bad = sorted(set(text.upper()) - {"T", "F"})
        if bad:
            raise _fail(value, num_stages, f"unexpected character(s) {''.join(bad)!r}; use only T and F")
        flags = tuple(ch == "T" for ch in text.upper())
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        items = list(value)
        if not all(isinstance(v, bool) or (hasattr(v, "item") and isinstance(v.item(), bool)) for v in items):
            raise _fail(value, num_stages, "a sequence must hold only True/False")
        flags = tuple(bool(v) for v in items)
        if not flags:
            raise _fail(value, num_stages, "it is empty")
    else:
        raise _fail(value, num_stages, f"unsupported type {type(value).__name__}")
    if num_stages is not None and len(flags) != num_stages:
        raise _fail(value, num_stages, f"it has {len(flags)} flags, expected {num_stages}")
    return flags
