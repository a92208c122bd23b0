"""DefinitionService against the real server, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2

from gyoza.api.v1 import definition_service_pb2 as dpb
from gyoza.api.v1 import op_definition_pb2, resources_pb2

ExpectError = Callable[[Callable[[], Any]], Any]


def definition(name: str = "resize", image: str = "busybox:latest", **kwargs: Any) -> Any:
    return op_definition_pb2.OpDefinition(
        name=name,
        image=image,
        description="resizes images",
        inputs=[
            resources_pb2.InputSpec(
                name="path", type=resources_pb2.INPUT_TYPE_STRING, required=True
            ),
            resources_pb2.InputSpec(
                name="width",
                type=resources_pb2.INPUT_TYPE_INT,
                default_value=struct_pb2.Value(number_value=640),
            ),
        ],
        constraints=resources_pb2.Constraints(cpu=1, ram_mb=256),
        **kwargs,
    )


def test_create_assigns_versions_and_get_returns_latest_or_asked(stubs: Any) -> None:
    first = stubs.definitions.CreateOpDefinition(
        dpb.CreateOpDefinitionRequest(op_definition=definition())
    ).op_definition
    second = stubs.definitions.CreateOpDefinition(
        dpb.CreateOpDefinitionRequest(op_definition=definition(image="busybox:1.36"))
    ).op_definition
    assert (first.version, second.version) == (1, 2)
    assert first.create_time.seconds > 0
    assert [i.name for i in first.inputs] == ["path", "width"]

    latest = stubs.definitions.GetOpDefinition(dpb.GetOpDefinitionRequest(name="resize"))
    assert latest.op_definition.version == 2
    assert latest.op_definition.image == "busybox:1.36"
    older = stubs.definitions.GetOpDefinition(dpb.GetOpDefinitionRequest(name="resize", version=1))
    assert older.op_definition.image == "busybox:latest"
    assert older.op_definition.inputs[1].default_value.number_value == 640


def test_get_errors(stubs: Any, expect_error: ExpectError) -> None:
    stubs.definitions.CreateOpDefinition(dpb.CreateOpDefinitionRequest(op_definition=definition()))
    missing = expect_error(
        lambda: stubs.definitions.GetOpDefinition(dpb.GetOpDefinitionRequest(name="nope"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert missing.reason == "NOT_FOUND"
    no_version = expect_error(
        lambda: stubs.definitions.GetOpDefinition(
            dpb.GetOpDefinitionRequest(name="resize", version=9)
        )
    )
    assert no_version.code == grpc.StatusCode.NOT_FOUND
    empty = expect_error(lambda: stubs.definitions.GetOpDefinition(dpb.GetOpDefinitionRequest()))
    assert empty.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in empty.violations


def test_create_lists_every_violation_at_once(stubs: Any, expect_error: ExpectError) -> None:
    bad = op_definition_pb2.OpDefinition(
        name="Bad Name!",
        image="",
        inputs=[
            resources_pb2.InputSpec(name="a", type=resources_pb2.INPUT_TYPE_UNSPECIFIED),
            resources_pb2.InputSpec(
                name="b",
                type=resources_pb2.INPUT_TYPE_INT,
                default_value=struct_pb2.Value(string_value="x"),
            ),
        ],
        constraints=resources_pb2.Constraints(cpu=-1),
    )
    error = expect_error(
        lambda: stubs.definitions.CreateOpDefinition(
            dpb.CreateOpDefinitionRequest(op_definition=bad)
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_INPUT"
    assert "op_definition.name" in error.violations
    assert "op_definition.image" in error.violations
    assert "op_definition.constraints.cpu" in error.violations
    assert any(f.startswith("op_definition.inputs[0]") for f in error.violations)

    # With the input types valid, the bad default is reported with the rest.
    bad.inputs[0].type = resources_pb2.INPUT_TYPE_STRING
    error = expect_error(
        lambda: stubs.definitions.CreateOpDefinition(
            dpb.CreateOpDefinitionRequest(op_definition=bad)
        )
    )
    assert "op_definition.inputs[1].default" in error.violations
    assert "op_definition.name" in error.violations


def test_declared_outputs_are_kept_and_checked(stubs: Any, expect_error: ExpectError) -> None:
    outputs = [
        resources_pb2.OutputSpec(
            name="url", type=resources_pb2.INPUT_TYPE_STRING, required=True, description="where"
        ),
        resources_pb2.OutputSpec(name="count", type=resources_pb2.INPUT_TYPE_INT),
    ]
    stubs.definitions.CreateOpDefinition(
        dpb.CreateOpDefinitionRequest(op_definition=definition(outputs=outputs))
    )
    got = stubs.definitions.GetOpDefinition(dpb.GetOpDefinitionRequest(name="resize"))
    assert list(got.op_definition.outputs) == outputs

    bad = [
        resources_pb2.OutputSpec(name="a", type=resources_pb2.INPUT_TYPE_UNSPECIFIED),
        resources_pb2.OutputSpec(name="", type=resources_pb2.INPUT_TYPE_INT),
    ]
    error = expect_error(
        lambda: stubs.definitions.CreateOpDefinition(
            dpb.CreateOpDefinitionRequest(op_definition=definition(outputs=bad))
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "op_definition.outputs[0].type" in error.violations
    bad[0].type = resources_pb2.INPUT_TYPE_BOOL
    error = expect_error(
        lambda: stubs.definitions.CreateOpDefinition(
            dpb.CreateOpDefinitionRequest(op_definition=definition(outputs=bad))
        )
    )
    assert "op_definition.outputs[1].name" in error.violations


def test_list_latest_by_name_and_versions_of_one_name_paged(stubs: Any) -> None:
    for name in ("c-op", "a-op", "b-op"):
        for _ in range(2):
            stubs.definitions.CreateOpDefinition(
                dpb.CreateOpDefinitionRequest(op_definition=definition(name=name))
            )
    listed = stubs.definitions.ListOpDefinitions(dpb.ListOpDefinitionsRequest())
    assert [(d.name, d.version) for d in listed.op_definitions] == [
        ("a-op", 2),
        ("b-op", 2),
        ("c-op", 2),
    ]
    assert listed.next_page_token == ""

    page = stubs.definitions.ListOpDefinitions(dpb.ListOpDefinitionsRequest(page_size=2))
    assert [d.name for d in page.op_definitions] == ["a-op", "b-op"]
    rest = stubs.definitions.ListOpDefinitions(
        dpb.ListOpDefinitionsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [d.name for d in rest.op_definitions] == ["c-op"]
    assert rest.next_page_token == ""

    versions = stubs.definitions.ListOpDefinitions(
        dpb.ListOpDefinitionsRequest(name="b-op", page_size=1)
    )
    assert [d.version for d in versions.op_definitions] == [2]
    older = stubs.definitions.ListOpDefinitions(
        dpb.ListOpDefinitionsRequest(name="b-op", page_size=1, page_token=versions.next_page_token)
    )
    assert [d.version for d in older.op_definitions] == [1]


def test_list_refuses_bad_paging(stubs: Any, expect_error: ExpectError) -> None:
    negative = expect_error(
        lambda: stubs.definitions.ListOpDefinitions(dpb.ListOpDefinitionsRequest(page_size=-1))
    )
    assert negative.code == grpc.StatusCode.INVALID_ARGUMENT
    garbage = expect_error(
        lambda: stubs.definitions.ListOpDefinitions(
            dpb.ListOpDefinitionsRequest(page_token="not-a-token")
        )
    )
    assert garbage.code == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_one_version_or_all(stubs: Any, expect_error: ExpectError) -> None:
    for _ in range(3):
        stubs.definitions.CreateOpDefinition(
            dpb.CreateOpDefinitionRequest(op_definition=definition())
        )
    one = stubs.definitions.DeleteOpDefinition(
        dpb.DeleteOpDefinitionRequest(name="resize", version=3)
    )
    assert one.deleted_count == 1
    assert (
        stubs.definitions.GetOpDefinition(
            dpb.GetOpDefinitionRequest(name="resize")
        ).op_definition.version
        == 2
    )
    rest = stubs.definitions.DeleteOpDefinition(dpb.DeleteOpDefinitionRequest(name="resize"))
    assert rest.deleted_count == 2
    gone = expect_error(
        lambda: stubs.definitions.DeleteOpDefinition(dpb.DeleteOpDefinitionRequest(name="resize"))
    )
    assert gone.code == grpc.StatusCode.NOT_FOUND
    empty = expect_error(
        lambda: stubs.definitions.DeleteOpDefinition(dpb.DeleteOpDefinitionRequest())
    )
    assert empty.code == grpc.StatusCode.INVALID_ARGUMENT
