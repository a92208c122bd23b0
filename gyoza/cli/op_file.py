"""``op.yaml``: an op definition as a file, for ``gyoza definitions deploy``.

::

    name: render                  # lowercase letters, digits, '.', '_', '-'
    version: 3                    # informational: the server assigns versions
    image: ghcr.io/acme/render:1
    description: Renders a prompt
    inputs:
      prompt: {type: string, required: true, description: What to draw}
      steps: {type: int, default: 30}
      tags: array                 # shorthand for {type: array}
    outputs:                      # what a completed run's outputs must hold
      image_url: {type: string, required: true, description: Where the picture is}
      seconds: float
    constraints: {cpu: 2, ram_mb: 4096, vram_mb: 8000, gpu_count: 1, gpu_id: 0, timeout_s: 600,
                  queue_timeout_s: 3600, selector: "executor = docker, zone != eu-1"}
    retry_policy: {max_attempts: 3, initial_delay_s: 1, backoff_multiplier: 2,
                   max_delay_s: 60, retry_on: [EXIT_CODE, OOM]}
    event_delivery: {topic: renders, attributes: {team: vision}}

Every problem is reported at once, each naming its key and what it expected:
``op.yaml: inputs.steps.type: expected one of string, int, float, bool, object, array,
got 'integer'``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gyoza.models.op_definition import InputSpec, InputType, OpDefinition, OutputSpec
from gyoza.models.resources import Constraints, EventDelivery, FailureClass, RetryPolicy

__all__ = ["OpFileError", "load_op_file", "parse_op_file"]

_TOP_KEYS = (
    "name",
    "version",
    "image",
    "description",
    "inputs",
    "outputs",
    "constraints",
    "retry_policy",
    "event_delivery",
)
_INPUT_KEYS = ("type", "required", "default", "description")
_OUTPUT_KEYS = ("type", "required", "description")
_TYPE_NAMES = tuple(t.value.lower() for t in InputType)
_FAILURE_NAMES = tuple(c.value for c in FailureClass)


class OpFileError(ValueError):
    """An op file that cannot be read or is not a valid definition.

    Parameters
    ----------
    source : str
        The file's name, as the messages show it.
    problems : list[str]
        Every problem, each ``"<key>: <what was expected>"``.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """One line per problem: ``"<source>: <key>: <what was expected>"``."""
        return [f"{self.source}: {problem}" for problem in self.problems]


def load_op_file(path: str | Path) -> OpDefinition:
    """Read and check an op file.

    Raises
    ------
    OpFileError
        When the file cannot be read, is not YAML, or is not a valid definition.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise OpFileError(source, [f"cannot read the file: {error.strerror or error}"]) from None
    except UnicodeDecodeError:
        raise OpFileError(source, ["cannot read the file: it is not UTF-8 text"]) from None
    return parse_op_file(text, source)


def parse_op_file(text: str, source: str = "op.yaml") -> OpDefinition:
    """Parse the text of an op file into an :class:`OpDefinition` (version 0).

    Parameters
    ----------
    text : str
        The YAML document.
    source : str
        The file's name, for messages.

    Raises
    ------
    OpFileError
        With every problem found.
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise OpFileError(source, [_yaml_problem(error)]) from None
    reader = _Reader()
    definition = reader.definition(document)
    if definition is not None and not reader.problems:
        reader.problems.extend(_domain_problems(definition))
    if reader.problems or definition is None:
        raise OpFileError(source, reader.problems)
    return definition


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"not valid YAML: {problem}"


def _domain_problems(definition: OpDefinition) -> list[str]:
    """The domain's own checks (name pattern, ranges), with op-file key paths."""
    names = {
        "inputs": [spec.name for spec in definition.inputs],
        "outputs": [spec.name for spec in definition.outputs],
    }

    def key(path: str) -> str:
        match = re.match(r"(inputs|outputs)\[(\d+)\](.*)", path)
        if match and int(match.group(2)) < len(names[match.group(1)]):
            return f"{match.group(1)}.{names[match.group(1)][int(match.group(2))]}{match.group(3)}"
        return path

    return [f"{key(v.field)}: {v.description}" for v in definition.validate()]


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


@dataclass
class _Reader:
    """Reads the document, collecting every problem instead of stopping at the first."""

    problems: list[str] = field(default_factory=list)

    def problem(self, key: str, expected: str, value: Any) -> None:
        self.problems.append(f"{key}: expected {expected}, got {_describe(value)}")

    # -- typed reads: each returns the value, or None after recording a problem --------

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...]) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self.problem(key, "a mapping", value)
            return None
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                self.problems.append(f"{where}: unknown key (expected one of {', '.join(allowed)})")
        return value

    def text(self, data: Mapping[str, Any], key: str, path: str, *, required: bool) -> str | None:
        value = data.get(key)
        if value is None:
            if required:
                self.problems.append(f"{path}: is required (a string)")
            return None
        if not isinstance(value, str) or (required and not value.strip()):
            self.problem(path, "a non-empty string" if required else "a string", value)
            return None
        return value

    def number(
        self, data: Mapping[str, Any], key: str, path: str, *, whole: bool
    ) -> int | float | None:
        value = data.get(key)
        if value is None:
            return None
        ok = isinstance(value, int) if whole else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            self.problem(path, "an integer" if whole else "a number", value)
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self.problem(path, "a finite number", value)
            return None
        number: int | float = value
        return number

    def flag(self, data: Mapping[str, Any], key: str, path: str) -> bool | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.problem(path, "true or false", value)
            return None
        return value

    # -- sections ------------------------------------------------------------------------

    def definition(self, document: Any) -> OpDefinition | None:
        data = self.mapping(document, "", _TOP_KEYS)
        if data is None:
            self.problems[-1] = (
                f"expected a mapping of {', '.join(_TOP_KEYS)}, got {_describe(document)}"
            )
            return None
        name = self.text(data, "name", "name", required=True)
        image = self.text(data, "image", "image", required=True)
        description = self.text(data, "description", "description", required=False)
        version = data.get("version")
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int | str)
        ):
            self.problem("version", "an integer or a string (it is informational)", version)
        inputs = self.inputs(data.get("inputs"))
        outputs = self.outputs(data.get("outputs"))
        constraints = self.section(data, "constraints", self.constraints, Constraints)
        retry_policy = self.section(data, "retry_policy", self.retry_policy, RetryPolicy)
        event_delivery = self.section(data, "event_delivery", self.event_delivery, EventDelivery)
        if name is None or image is None:
            return None
        return OpDefinition(
            name=name,
            image=image,
            description=description or "",
            inputs=inputs,
            outputs=outputs,
            constraints=constraints,
            retry_policy=retry_policy,
            event_delivery=event_delivery,
        )

    def section(
        self,
        data: Mapping[str, Any],
        key: str,
        read: Callable[[Mapping[str, Any]], Any],
        default: Callable[[], Any],
    ) -> Any:
        value = data.get(key)
        if value is None:
            return default()
        return read(value)

    def inputs(self, value: Any) -> list[InputSpec]:
        if value is None:
            return []
        if not isinstance(value, Mapping):
            self.problem(
                "inputs", "a mapping of input name to {type, required, default, description}", value
            )
            return []
        specs: list[InputSpec] = []
        for name, body in value.items():
            path = f"inputs.{name}"
            if not isinstance(name, str) or not name:
                self.problem("inputs", "input names that are strings", name)
                continue
            if body is None or isinstance(body, str):  # shorthand: `steps: int`
                body = {"type": body}
            spec = self.mapping(body, path, _INPUT_KEYS)
            if spec is None:
                continue
            input_type = self.input_type(spec.get("type"), f"{path}.type")
            required = self.flag(spec, "required", f"{path}.required") or False
            description = self.text(spec, "description", f"{path}.description", required=False)
            default = spec.get("default")
            if input_type is not None and default is not None:
                default = self.default(default, input_type, f"{path}.default")
            if input_type is not None:
                specs.append(
                    InputSpec(
                        name=name,
                        type=input_type,
                        required=required,
                        default=default,
                        description=description or "",
                    )
                )
        return specs

    def outputs(self, value: Any) -> list[OutputSpec]:
        if value is None:
            return []
        if not isinstance(value, Mapping):
            self.problem(
                "outputs", "a mapping of output name to {type, required, description}", value
            )
            return []
        specs: list[OutputSpec] = []
        for name, body in value.items():
            path = f"outputs.{name}"
            if not isinstance(name, str) or not name:
                self.problem("outputs", "output names that are strings", name)
                continue
            if body is None or isinstance(body, str):  # shorthand: `seconds: float`
                body = {"type": body}
            spec = self.mapping(body, path, _OUTPUT_KEYS)
            if spec is None:
                continue
            output_type = self.input_type(spec.get("type"), f"{path}.type")
            required = self.flag(spec, "required", f"{path}.required") or False
            description = self.text(spec, "description", f"{path}.description", required=False)
            if output_type is not None:
                specs.append(
                    OutputSpec(
                        name=name,
                        type=output_type,
                        required=required,
                        description=description or "",
                    )
                )
        return specs

    def input_type(self, value: Any, path: str) -> InputType | None:
        if value is None:
            self.problems.append(f"{path}: is required (one of {', '.join(_TYPE_NAMES)})")
            return None
        if isinstance(value, str) and value.lower() in _TYPE_NAMES:
            return InputType(value.upper())
        self.problem(path, f"one of {', '.join(_TYPE_NAMES)}", value)
        return None

    def default(self, value: Any, input_type: InputType, path: str) -> Any:
        check, words = _DEFAULT_CHECKS[input_type]
        if not check(value):
            self.problem(path, f"{words} ({input_type.value.lower()})", value)
            return None
        if not _is_json(value):
            self.problem(path, "a JSON value (strings, numbers, booleans, lists, mappings)", value)
            return None
        return value

    def constraints(self, value: Any) -> Constraints:
        keys = (
            "cpu",
            "ram_mb",
            "vram_mb",
            "gpu_count",
            "gpu_id",
            "timeout_s",
            "queue_timeout_s",
            "selector",
        )
        data = self.mapping(value, "constraints", keys)
        if data is None:
            return Constraints()
        cpu = self.number(data, "cpu", "constraints.cpu", whole=False)
        ram_mb = self.number(data, "ram_mb", "constraints.ram_mb", whole=True)
        vram_mb = self.number(data, "vram_mb", "constraints.vram_mb", whole=True)
        gpu_count = self.number(data, "gpu_count", "constraints.gpu_count", whole=True)
        gpu_id = self.number(data, "gpu_id", "constraints.gpu_id", whole=True)
        timeout_s = self.number(data, "timeout_s", "constraints.timeout_s", whole=False)
        queue_timeout_s = self.number(
            data, "queue_timeout_s", "constraints.queue_timeout_s", whole=False
        )
        selector = self.text(data, "selector", "constraints.selector", required=False)
        return Constraints(
            cpu=float(cpu or 0),
            ram_mb=int(ram_mb or 0),
            vram_mb=int(vram_mb or 0),
            gpu_count=int(gpu_count or 0),
            gpu_id=None if gpu_id is None else int(gpu_id),
            timeout_s=None if timeout_s is None else float(timeout_s),
            queue_timeout_s=None if queue_timeout_s is None else float(queue_timeout_s),
            selector=(selector or "").strip(),
        )

    def retry_policy(self, value: Any) -> RetryPolicy:
        keys = ("max_attempts", "initial_delay_s", "backoff_multiplier", "max_delay_s", "retry_on")
        data = self.mapping(value, "retry_policy", keys)
        defaults = RetryPolicy()
        if data is None:
            return defaults
        max_attempts = self.number(data, "max_attempts", "retry_policy.max_attempts", whole=True)
        initial = self.number(data, "initial_delay_s", "retry_policy.initial_delay_s", whole=False)
        multiplier = self.number(
            data, "backoff_multiplier", "retry_policy.backoff_multiplier", whole=False
        )
        max_delay = self.number(data, "max_delay_s", "retry_policy.max_delay_s", whole=False)
        return RetryPolicy(
            max_attempts=defaults.max_attempts if max_attempts is None else int(max_attempts),
            initial_delay_s=defaults.initial_delay_s if initial is None else float(initial),
            backoff_multiplier=(
                defaults.backoff_multiplier if multiplier is None else float(multiplier)
            ),
            max_delay_s=defaults.max_delay_s if max_delay is None else float(max_delay),
            retry_on=self.retry_on(data.get("retry_on"), defaults.retry_on),
        )

    def retry_on(self, value: Any, default: tuple[FailureClass, ...]) -> tuple[FailureClass, ...]:
        if value is None:
            return default
        if not isinstance(value, list):
            self.problem("retry_policy.retry_on", f"a list of {', '.join(_FAILURE_NAMES)}", value)
            return default
        classes: list[FailureClass] = []
        for index, item in enumerate(value):
            if isinstance(item, str) and item.upper() in _FAILURE_NAMES:
                classes.append(FailureClass(item.upper()))
            else:
                self.problem(
                    f"retry_policy.retry_on[{index}]", f"one of {', '.join(_FAILURE_NAMES)}", item
                )
        return tuple(classes)

    def event_delivery(self, value: Any) -> EventDelivery:
        data = self.mapping(value, "event_delivery", ("topic", "attributes"))
        if data is None:
            return EventDelivery()
        topic = self.text(data, "topic", "event_delivery.topic", required=False)
        attributes: dict[str, str] = {}
        raw = data.get("attributes")
        if raw is not None and not isinstance(raw, Mapping):
            self.problem("event_delivery.attributes", "a mapping of names to strings", raw)
        elif raw is not None:
            for key, item in raw.items():
                if isinstance(item, bool):
                    attributes[str(key)] = "true" if item else "false"
                elif isinstance(item, str | int | float):
                    attributes[str(key)] = str(item)
                else:
                    self.problem(f"event_delivery.attributes.{key}", "a string", item)
        return EventDelivery(topic=topic or "", attributes=attributes)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# What a default of each input type must be, and how to say it.
_DEFAULT_CHECKS: dict[InputType, tuple[Callable[[Any], bool], str]] = {
    InputType.STRING: (lambda v: isinstance(v, str), "a string"),
    InputType.INT: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    InputType.FLOAT: (_is_number, "a number"),
    InputType.BOOL: (lambda v: isinstance(v, bool), "true or false"),
    InputType.OBJECT: (lambda v: isinstance(v, Mapping), "a mapping"),
    InputType.ARRAY: (lambda v: isinstance(v, list), "a list"),
}


def _is_json(value: Any) -> bool:
    """True when *value* is made of JSON values only (YAML also has dates, sets...)."""
    if value is None or isinstance(value, str | bool | int | float):
        return not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False
