"""OpDefinition: a named, versioned op that runs are created from."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gyoza.models.errors import FieldViolation, InvalidInput
from gyoza.models.op_run import OpRun
from gyoza.models.outputs import OutputSpec
from gyoza.models.resources import Constraints, EventDelivery, RetryPolicy
from gyoza.models.timestamps import format_timestamp, parse_optional_timestamp, utc_now
from gyoza.models.value_types import MISMATCH as _MISMATCH
from gyoza.models.value_types import InputType
from gyoza.models.value_types import coerce as _coerce
from gyoza.models.value_types import json_type as _json_type

__all__ = ["NAME_PATTERN", "InputSpec", "InputType", "OpDefinition", "OutputSpec"]

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
"""What a definition name must match: lowercase, digits, ``.``, ``_``, ``-``; <= 128."""


@dataclass
class InputSpec:
    """One input an op takes.

    Parameters
    ----------
    name : str
        Input key in the run's inputs.
    type : InputType
        JSON type the value must have.
    required : bool
        Whether a run must give it. A required input takes no default.
    default : Any
        Value used when a run leaves it out (``None``: left out).
    description : str
        What it is for.
    """

    name: str
    type: InputType
    required: bool = False
    default: Any = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary."""
        return {
            "name": self.name,
            "type": self.type.value,
            "required": self.required,
            "default": copy.deepcopy(self.default),
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        """Deserialise; only ``name`` and ``type`` are needed."""
        return cls(
            name=str(data["name"]),
            type=InputType(data["type"]),
            required=bool(data.get("required", False)),
            default=copy.deepcopy(data.get("default")),
            description=str(data.get("description") or ""),
        )


@dataclass
class OpDefinition:
    """A named, versioned op: image, typed inputs and run settings.

    Parameters
    ----------
    name : str
        Matches :data:`NAME_PATTERN`.
    version : int
        Version number; 0 until the store assigns one.
    image : str
        Docker image reference.
    inputs : list[InputSpec]
        Inputs the op takes.
    outputs : list[OutputSpec]
        Outputs the op declares; a run whose outputs break them fails as
        ``OUTPUT_INVALID``.
    constraints : Constraints
        Resources its runs need unless a run overrides them.
    retry_policy : RetryPolicy
        Retry rules of its runs unless a run overrides them.
    event_delivery : EventDelivery
        Topic publication of its runs unless a run overrides it.
    description : str
        What the op does.
    created_at : datetime
        When this version was created.
    """

    name: str
    version: int = 0
    image: str = ""
    inputs: list[InputSpec] = field(default_factory=list)
    outputs: list[OutputSpec] = field(default_factory=list)
    constraints: Constraints = field(default_factory=Constraints)
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    event_delivery: EventDelivery = field(default_factory=EventDelivery)
    description: str = ""
    created_at: datetime = field(default_factory=utc_now)

    def validate(self) -> list[FieldViolation]:
        """Return every problem with the definition itself (empty when valid)."""
        violations: list[FieldViolation] = []
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            violations.append(
                FieldViolation(
                    "name",
                    f"{self.name!r} must match {NAME_PATTERN.pattern} "
                    "(lowercase letters, digits, '.', '_', '-'; at most 128)",
                )
            )
        if self.version < 0:
            violations.append(FieldViolation("version", f"must be >= 0 (got {self.version})"))
        if not isinstance(self.image, str) or not self.image.strip():
            violations.append(FieldViolation("image", "must not be empty"))
        seen: set[str] = set()
        for index, spec in enumerate(self.inputs):
            where = f"inputs[{index}]"
            if not spec.name:
                violations.append(FieldViolation(f"{where}.name", "must not be empty"))
            elif spec.name in seen:
                violations.append(
                    FieldViolation(f"{where}.name", f"duplicate input name {spec.name!r}")
                )
            seen.add(spec.name)
            if spec.default is None:
                continue
            if spec.required:
                violations.append(
                    FieldViolation(f"{where}.default", "a required input takes no default")
                )
            elif _coerce(spec.type, spec.default) is _MISMATCH:
                violations.append(
                    FieldViolation(
                        f"{where}.default",
                        f"expected {spec.type.value}, got {_json_type(spec.default)}",
                    )
                )
        declared: set[str] = set()
        for index, output in enumerate(self.outputs):
            where = f"outputs[{index}].name"
            if not output.name:
                violations.append(FieldViolation(where, "must not be empty"))
            elif output.name in declared:
                violations.append(FieldViolation(where, f"duplicate output name {output.name!r}"))
            declared.add(output.name)
        violations.extend(
            FieldViolation(f"constraints.{v.field}", v.description)
            for v in self.constraints.validate()
        )
        violations.extend(
            FieldViolation(f"retry_policy.{v.field}", v.description)
            for v in self.retry_policy.validate()
        )
        return violations

    def validate_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Check a run's inputs against the specs; return them with defaults filled.

        A ``None`` value counts as left out. Unknown keys are refused.

        Parameters
        ----------
        inputs : Mapping[str, Any]
            The inputs a run was asked with.

        Returns
        -------
        dict[str, Any]
            A new dictionary: the given values (integral floats of INT inputs made
            int) and the defaults of the optional inputs left out.

        Raises
        ------
        InvalidInput
            With every violation at once: missing required inputs, values of the
            wrong type, unknown keys.
        """
        if not isinstance(inputs, Mapping):
            raise InvalidInput([FieldViolation("inputs", "must be an object")])
        violations: list[FieldViolation] = []
        result: dict[str, Any] = {}
        for spec in self.inputs:
            value = inputs.get(spec.name)
            where = f"inputs.{spec.name}"
            if value is None:
                if spec.required:
                    violations.append(FieldViolation(where, f"is required ({spec.type.value})"))
                elif spec.default is not None:
                    result[spec.name] = copy.deepcopy(_coerce(spec.type, spec.default))
                continue
            coerced = _coerce(spec.type, value)
            if coerced is _MISMATCH:
                violations.append(
                    FieldViolation(where, f"expected {spec.type.value}, got {_json_type(value)}")
                )
            else:
                result[spec.name] = copy.deepcopy(coerced)
        known = {spec.name for spec in self.inputs}
        accepted = ", ".join(sorted(known)) or "none"
        for key in sorted(k for k in inputs if k not in known):
            violations.append(
                FieldViolation(f"inputs.{key}", f"unknown input; {self.name} takes: {accepted}")
            )
        if violations:
            raise InvalidInput(violations)
        return result

    def create_run(
        self,
        inputs: Mapping[str, Any],
        priority: int = 0,
        constraints: Constraints | None = None,
        retry_policy: RetryPolicy | None = None,
        event_delivery: EventDelivery | None = None,
        request_id: str | None = None,
    ) -> OpRun:
        """Create a PENDING run of this op.

        The definition's image, constraints, retry policy and event delivery apply
        unless overridden; the run records the definition's name and version and
        keeps its declared outputs, which its outputs are checked against.

        Parameters
        ----------
        inputs : Mapping[str, Any]
            The run's inputs, validated against the specs.
        priority : int
            Scheduling priority, >= 0.
        constraints, retry_policy, event_delivery
            Overrides of the definition's settings.
        request_id : str | None
            Idempotency key of the create request.

        Returns
        -------
        OpRun
            The new run.

        Raises
        ------
        InvalidInput
            With every violation of the inputs and the run settings at once.
        """
        violations: list[FieldViolation] = []
        filled: dict[str, Any] = {}
        try:
            filled = self.validate_inputs(inputs)
        except InvalidInput as error:
            violations.extend(error.violations)
        chosen_constraints = copy.deepcopy(
            constraints if constraints is not None else self.constraints
        )
        chosen_policy = copy.deepcopy(
            retry_policy if retry_policy is not None else self.retry_policy
        )
        chosen_delivery = copy.deepcopy(
            event_delivery if event_delivery is not None else self.event_delivery
        )
        violations.extend(
            OpRun.settings_violations(self.image, priority, chosen_constraints, chosen_policy)
        )
        if violations:
            raise InvalidInput(violations)
        return OpRun.create(
            image=self.image,
            priority=priority,
            inputs=filled,
            constraints=chosen_constraints,
            retry_policy=chosen_policy,
            event_delivery=chosen_delivery,
            op_definition=self.name,
            op_definition_version=self.version,
            request_id=request_id,
            output_specs=copy.deepcopy(self.outputs),
        )

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary."""
        return {
            "name": self.name,
            "version": self.version,
            "image": self.image,
            "description": self.description,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "constraints": self.constraints.to_dict(),
            "retry_policy": self.retry_policy.to_dict(),
            "event_delivery": self.event_delivery.to_dict(),
            "createdAt": format_timestamp(self.created_at),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpDefinition:
        """Deserialise; missing keys take their defaults (``name`` is needed)."""
        created_at = parse_optional_timestamp(data.get("createdAt") or data.get("created_at"))
        return cls(
            name=str(data["name"]),
            version=int(data.get("version") or 0),
            image=str(data.get("image") or ""),
            inputs=[InputSpec.from_dict(spec) for spec in data.get("inputs") or []],
            outputs=[OutputSpec.from_dict(spec) for spec in data.get("outputs") or []],
            constraints=Constraints.from_dict(data.get("constraints") or {}),
            retry_policy=RetryPolicy.from_dict(data.get("retry_policy") or {}),
            event_delivery=EventDelivery.from_dict(data.get("event_delivery") or {}),
            description=str(data.get("description") or ""),
            created_at=created_at or utc_now(),
        )
