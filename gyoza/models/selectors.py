"""Label selectors: where a run may go.

A selector is a comma-separated list of requirements, all of which an agent's labels
must meet (the syntax of Kubernetes label selectors, with values that may hold spaces
such as GPU model names)::

    executor = docker               equality (``==`` works too)
    zone != eu-1                    inequality: true when the label is absent too
    gpu.model in (NVIDIA H100 80GB HBM3, NVIDIA A100-SXM4-80GB)
    zone notin (eu-1, eu-2)         true when the label is absent too
    ssd                             the label exists (any value)
    !spot                           the label does not exist

Keys are ``[A-Za-z0-9._/-]+``; values are trimmed and may not contain ``,``, ``(``,
``)``, ``=`` or ``!``. An empty selector matches every agent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["LabelSelector", "Operator", "Requirement", "SelectorError"]

_KEY = r"[A-Za-z0-9][A-Za-z0-9._/-]*"
_VALUE_CHARS = re.compile(r"^[^,()=!]*$")
_SET = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)\s*$")
_COMPARE = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>[^,()=!]*?)\s*$")
_EXISTS = re.compile(rf"^\s*(?P<neg>!?)\s*(?P<key>{_KEY})\s*$")


class SelectorError(ValueError):
    """A selector that cannot be parsed; the message says what is wrong."""


class Operator(StrEnum):
    """How a requirement compares a label."""

    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!exists"


@dataclass(frozen=True)
class Requirement:
    """One condition on one label."""

    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether the labels meet this requirement."""
        value = labels.get(self.key)
        match self.operator:
            case Operator.EQUALS | Operator.IN:
                return value is not None and value in self.values
            case Operator.NOT_EQUALS | Operator.NOT_IN:
                return value is None or value not in self.values
            case Operator.EXISTS:
                return value is not None
            case Operator.DOES_NOT_EXIST:
                return value is None

    def __str__(self) -> str:
        match self.operator:
            case Operator.EXISTS:
                return self.key
            case Operator.DOES_NOT_EXIST:
                return f"!{self.key}"
            case Operator.IN | Operator.NOT_IN:
                return f"{self.key} {self.operator.value} ({', '.join(sorted(self.values))})"
            case _:
                (value,) = self.values
                return f"{self.key}{self.operator.value}{value}"


@dataclass(frozen=True)
class LabelSelector:
    """A parsed selector: every requirement must hold."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Parse a selector.

        Raises
        ------
        SelectorError
            When a requirement cannot be parsed.
        """
        requirements: list[Requirement] = []
        for part in _split(text):
            requirements.append(_parse_requirement(part))
        return cls(tuple(requirements))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether an agent with these labels may take the run."""
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return ", ".join(str(r) for r in self.requirements)


def _split(text: str) -> list[str]:
    """Split on the commas that are not inside parentheses; blank parts are dropped."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"unbalanced ')' in selector {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise SelectorError(f"unbalanced '(' in selector {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def _parse_requirement(part: str) -> Requirement:
    found = _SET.match(part)
    if found:
        values = frozenset(v.strip() for v in found["values"].split(",") if v.strip())
        if not values:
            raise SelectorError(f"{part.strip()!r}: '{found['op']}' needs at least one value")
        bad = [v for v in values if not _VALUE_CHARS.match(v)]
        if bad:
            raise SelectorError(f"{part.strip()!r}: invalid value {bad[0]!r}")
        operator = Operator.IN if found["op"] == "in" else Operator.NOT_IN
        return Requirement(found["key"], operator, values)
    found = _COMPARE.match(part)
    if found:
        operator = Operator.NOT_EQUALS if found["op"] == "!=" else Operator.EQUALS
        return Requirement(found["key"], operator, frozenset({found["value"]}))
    found = _EXISTS.match(part)
    if found:
        operator = Operator.DOES_NOT_EXIST if found["neg"] else Operator.EXISTS
        return Requirement(found["key"], operator)
    raise SelectorError(
        f"cannot parse {part.strip()!r}: expected 'key = value', 'key != value', "
        "'key in (a, b)', 'key notin (a, b)', 'key' or '!key'"
    )
