"""op.yaml parsing: a good file becomes an OpDefinition; a bad one names key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from gyoza.cli.op_file import OpFileError, load_op_file, parse_op_file
from gyoza.models.op_definition import InputSpec, InputType
from gyoza.models.outputs import OutputSpec
from gyoza.models.resources import Constraints, EventDelivery, FailureClass, RetryPolicy

FULL = """
name: render
version: 3
image: ghcr.io/acme/render:1
description: Renders a prompt
inputs:
  prompt: {type: string, required: true, description: What to draw}
  steps: {type: int, default: 30}
  scale: {type: FLOAT, default: 7}
  upscale: {type: bool, default: false}
  extra: {type: object, default: {k: [1, 2]}}
  tags: array
constraints: {cpu: 2, ram_mb: 4096, vram_mb: 8000, gpu_count: 1, gpu_id: 0, timeout_s: 600}
retry_policy:
  max_attempts: 4
  initial_delay_s: 0.5
  backoff_multiplier: 3
  max_delay_s: 20
  retry_on: [EXIT_CODE, oom]
event_delivery: {topic: renders, attributes: {team: vision, tier: 1, gpu: true}}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(OpFileError) as error:
        parse_op_file(text)
    return error.value.lines()


def test_full_file() -> None:
    definition = parse_op_file(FULL)
    assert definition.name == "render"
    assert definition.version == 0  # the server assigns versions
    assert definition.image == "ghcr.io/acme/render:1"
    assert definition.description == "Renders a prompt"
    assert definition.inputs == [
        InputSpec("prompt", InputType.STRING, required=True, description="What to draw"),
        InputSpec("steps", InputType.INT, default=30),
        InputSpec("scale", InputType.FLOAT, default=7),
        InputSpec("upscale", InputType.BOOL, default=False),
        InputSpec("extra", InputType.OBJECT, default={"k": [1, 2]}),
        InputSpec("tags", InputType.ARRAY),
    ]
    assert definition.constraints == Constraints(
        cpu=2.0, ram_mb=4096, vram_mb=8000, gpu_count=1, gpu_id=0, timeout_s=600.0
    )
    assert definition.retry_policy == RetryPolicy(
        max_attempts=4,
        initial_delay_s=0.5,
        backoff_multiplier=3.0,
        max_delay_s=20.0,
        retry_on=(FailureClass.EXIT_CODE, FailureClass.OOM),
    )
    assert definition.event_delivery == EventDelivery(
        topic="renders", attributes={"team": "vision", "tier": "1", "gpu": "true"}
    )


def test_minimal_file_takes_defaults() -> None:
    definition = parse_op_file("name: hello\nimage: busybox\n")
    assert definition.inputs == []
    assert definition.constraints == Constraints()
    assert definition.retry_policy == RetryPolicy()
    assert definition.event_delivery == EventDelivery()
    assert definition.description == ""


def test_partial_retry_policy_keeps_the_other_defaults() -> None:
    definition = parse_op_file("name: a\nimage: b\nretry_policy: {max_attempts: 1}\n")
    assert definition.retry_policy == RetryPolicy(max_attempts=1)


def test_wrong_input_type_names_the_key_and_the_choices() -> None:
    text = "name: a\nimage: b\ninputs:\n  steps: {type: integer}\n"
    assert problems(text) == [
        "op.yaml: inputs.steps.type: expected one of string, int, float, bool, object, "
        "array, got 'integer'"
    ]


def test_missing_input_type() -> None:
    assert problems("name: a\nimage: b\ninputs:\n  steps: {required: true}\n") == [
        "op.yaml: inputs.steps.type: is required (one of string, int, float, bool, object, array)"
    ]
    assert problems("name: a\nimage: b\ninputs:\n  steps:\n") == [
        "op.yaml: inputs.steps.type: is required (one of string, int, float, bool, object, array)"
    ]


def test_missing_name_and_image_are_both_reported() -> None:
    assert problems("description: x\n") == [
        "op.yaml: name: is required (a string)",
        "op.yaml: image: is required (a string)",
    ]


def test_unknown_keys_are_refused() -> None:
    assert problems("name: a\nimgae: b\nimage: c\n") == [
        "op.yaml: imgae: unknown key (expected one of name, version, image, description, "
        "inputs, outputs, constraints, retry_policy, event_delivery)"
    ]
    assert problems("name: a\nimage: c\ninputs: {x: {type: int, defualt: 1}}\n") == [
        "op.yaml: inputs.x.defualt: unknown key (expected one of type, required, default, "
        "description)"
    ]
    assert problems("name: a\nimage: c\nconstraints: {gpus: 1}\n") == [
        "op.yaml: constraints.gpus: unknown key (expected one of cpu, ram_mb, vram_mb, "
        "gpu_count, gpu_id, timeout_s, queue_timeout_s, selector)"
    ]


def test_default_of_the_wrong_type() -> None:
    text = "name: a\nimage: b\ninputs:\n  steps: {type: int, default: many}\n"
    assert problems(text) == [
        "op.yaml: inputs.steps.default: expected an integer (int), got 'many'"
    ]
    text = "name: a\nimage: b\ninputs:\n  n: {type: int, default: true}\n"
    assert problems(text) == [
        "op.yaml: inputs.n.default: expected an integer (int), got true (a boolean)"
    ]
    text = "name: a\nimage: b\ninputs:\n  when: {type: string, default: 2024-01-01}\n"
    assert problems(text) == [
        "op.yaml: inputs.when.default: expected a string (string), got datetime.date(2024, 1, 1)"
    ]


def test_domain_rules_are_reported_with_file_keys() -> None:
    text = "name: a\nimage: b\ninputs:\n  p: {type: string, required: true, default: x}\n"
    assert problems(text) == ["op.yaml: inputs.p.default: a required input takes no default"]
    assert problems("name: Bad Name\nimage: b\n")[0].startswith("op.yaml: name: 'Bad Name' must")
    assert problems("name: a\nimage: b\nconstraints: {cpu: -1}\n") == [
        "op.yaml: constraints.cpu: must be >= 0 (got -1.0)"
    ]
    assert problems("name: a\nimage: b\nretry_policy: {max_attempts: 0}\n") == [
        "op.yaml: retry_policy.max_attempts: must be >= 1 (got 0)"
    ]


def test_wrong_scalar_types() -> None:
    text = (
        "name: 5\nimage: ''\ndescription: [x]\nversion: 1.5\n"
        "constraints: {cpu: lots, ram_mb: 1.5, timeout_s: .inf}\n"
        "retry_policy: {retry_on: [EXIT_CODE, SOMETIMES], backoff_multiplier: x}\n"
        "event_delivery: {topic: 3, attributes: {a: [1]}}\n"
    )
    assert problems(text) == [
        "op.yaml: name: expected a non-empty string, got 5",
        "op.yaml: image: expected a non-empty string, got ''",
        "op.yaml: description: expected a string, got a list",
        "op.yaml: version: expected an integer or a string (it is informational), got 1.5",
        "op.yaml: constraints.cpu: expected a number, got 'lots'",
        "op.yaml: constraints.ram_mb: expected an integer, got 1.5",
        "op.yaml: constraints.timeout_s: expected a finite number, got inf",
        "op.yaml: retry_policy.backoff_multiplier: expected a number, got 'x'",
        "op.yaml: retry_policy.retry_on[1]: expected one of EXIT_CODE, OOM, TIMEOUT, "
        "IMAGE_MISSING, AGENT_LOST, CANCELLED, OUTPUT_INVALID, EXECUTOR_ERROR, QUEUE_TIMEOUT, got 'SOMETIMES'",
        "op.yaml: event_delivery.topic: expected a string, got 3",
        "op.yaml: event_delivery.attributes.a: expected a string, got a list",
    ]


def test_sections_of_the_wrong_shape() -> None:
    text = "name: a\nimage: b\ninputs: [x]\nconstraints: 4\nretry_policy: {retry_on: OOM}\n"
    assert problems(text) == [
        "op.yaml: inputs: expected a mapping of input name to {type, required, default, "
        "description}, got a list",
        "op.yaml: constraints: expected a mapping, got 4",
        "op.yaml: retry_policy.retry_on: expected a list of EXIT_CODE, OOM, TIMEOUT, "
        "IMAGE_MISSING, AGENT_LOST, CANCELLED, OUTPUT_INVALID, EXECUTOR_ERROR, QUEUE_TIMEOUT, got 'OOM'",
    ]


def test_document_that_is_not_a_mapping() -> None:
    assert problems("- a\n- b\n") == [
        "op.yaml: expected a mapping of name, version, image, description, inputs, outputs, "
        "constraints, retry_policy, event_delivery, got a list"
    ]
    assert problems("") == [
        "op.yaml: expected a mapping of name, version, image, description, inputs, outputs, "
        "constraints, retry_policy, event_delivery, got nothing"
    ]


def test_invalid_yaml_gives_the_position() -> None:
    (line,) = problems("name: a\nimage: [b\n")
    assert line.startswith("op.yaml: not valid YAML: line 3, column 1:")


def test_load_op_file_reads_a_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "render.yaml"
    path.write_text("name: render\nimage: busybox\ninputs: {n: {type: int}}\n")
    assert load_op_file(path).inputs == [InputSpec("n", InputType.INT)]
    path.write_text("name: render\n")
    with pytest.raises(OpFileError) as error:
        load_op_file(path)
    assert error.value.lines() == [f"{path}: image: is required (a string)"]


def test_load_op_file_that_is_missing(tmp_path: Path) -> None:
    with pytest.raises(OpFileError) as error:
        load_op_file(tmp_path / "nope.yaml")
    assert error.value.lines() == [
        f"{tmp_path / 'nope.yaml'}: cannot read the file: No such file or directory"
    ]


def test_declared_outputs() -> None:
    definition = parse_op_file(
        "name: a\nimage: b\noutputs:\n"
        "  url: {type: string, required: true, description: Where it is}\n"
        "  seconds: float\n"
    )
    assert definition.outputs == [
        OutputSpec("url", InputType.STRING, required=True, description="Where it is"),
        OutputSpec("seconds", InputType.FLOAT),
    ]
    assert problems("name: a\nimage: b\noutputs:\n  url: {type: text, default: x}\n") == [
        "op.yaml: outputs.url.default: unknown key (expected one of type, required, description)",
        "op.yaml: outputs.url.type: expected one of string, int, float, bool, object, array, "
        "got 'text'",
    ]
    assert problems("name: a\nimage: b\noutputs: [url]\n") == [
        "op.yaml: outputs: expected a mapping of output name to {type, required, "
        "description}, got a list"
    ]


def test_selector_and_queue_timeout() -> None:
    definition = parse_op_file(
        "name: a\nimage: c\nconstraints:\n  gpu_count: 1\n  queue_timeout_s: 90\n"
        "  selector: 'executor = docker, gpu.model in (NVIDIA H100 80GB HBM3)'\n"
    )
    assert definition.constraints.selector == (
        "executor = docker, gpu.model in (NVIDIA H100 80GB HBM3)"
    )
    assert definition.constraints.queue_timeout_s == 90.0
    (problem,) = problems("name: a\nimage: c\nconstraints: {selector: 'zone in (eu-1'}\n")
    assert problem.startswith("op.yaml: constraints.selector: unbalanced '('")
