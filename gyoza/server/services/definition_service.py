"""``gyoza.api.v1.DefinitionService``: named, versioned op definitions.

Thin: requests are mapped to the domain, checked by it, and stored; errors propagate to
the error interceptor, which picks their status codes.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from gyoza import mapping
from gyoza.api.v1 import definition_service_pb2 as pb
from gyoza.api.v1 import definition_service_pb2_grpc
from gyoza.models.errors import FieldViolation, InvalidInput
from gyoza.models.op_definition import OpDefinition
from gyoza.server.services import request_checks
from gyoza.server.store.protocol import RunStore

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class DefinitionServiceServicer(definition_service_pb2_grpc.DefinitionServiceServicer):
    """Stores op definitions; each create adds a version of a name.

    Parameters
    ----------
    store : RunStore
        Where definitions live.
    """

    def __init__(self, store: RunStore) -> None:
        self.store = store

    async def CreateOpDefinition(
        self, request: pb.CreateOpDefinitionRequest, context: Context
    ) -> pb.CreateOpDefinitionResponse:
        """Validate the definition (every violation at once) and store its next version."""
        message = request.op_definition
        try:
            definition = mapping.definition_from_proto(message)
        except InvalidInput as error:
            # Its input specs or retry policy did not map; report the problems of the
            # rest of the definition in the same error.
            rest = OpDefinition(
                name=message.name,
                image=message.image,
                constraints=mapping.constraints_from_proto(message.constraints),
            )
            raise InvalidInput([*error.violations, *_prefixed(rest.validate())]) from None
        definition.version = 0
        violations = _prefixed(definition.validate())
        if violations:
            raise InvalidInput(violations)
        stored = await self.store.create_definition(definition)
        return pb.CreateOpDefinitionResponse(op_definition=mapping.definition_to_proto(stored))

    async def GetOpDefinition(
        self, request: pb.GetOpDefinitionRequest, context: Context
    ) -> pb.GetOpDefinitionResponse:
        """One version of a definition, the latest when none is given."""
        name = request_checks.required(request.name, "name")
        _check_version(request.version)
        definition = await self.store.get_definition(name, request.version or None)
        return pb.GetOpDefinitionResponse(op_definition=mapping.definition_to_proto(definition))

    async def ListOpDefinitions(
        self, request: pb.ListOpDefinitionsRequest, context: Context
    ) -> pb.ListOpDefinitionsResponse:
        """The latest version of every name, or every version of one name, paged."""
        size = request_checks.page_size(
            request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE
        )
        definitions, token = await self.store.list_definitions(
            name=request.name or None, page_size=size, page_token=request.page_token
        )
        return pb.ListOpDefinitionsResponse(
            op_definitions=[mapping.definition_to_proto(d) for d in definitions],
            next_page_token=token,
        )

    async def DeleteOpDefinition(
        self, request: pb.DeleteOpDefinitionRequest, context: Context
    ) -> pb.DeleteOpDefinitionResponse:
        """Delete one version, or every version of the name."""
        name = request_checks.required(request.name, "name")
        _check_version(request.version)
        deleted = await self.store.delete_definition(name, request.version or None)
        return pb.DeleteOpDefinitionResponse(deleted_count=deleted)


def _prefixed(violations: list[FieldViolation]) -> list[FieldViolation]:
    """Violations of a definition, named by their path in the request."""
    return [FieldViolation(f"op_definition.{v.field}", v.description) for v in violations]


def _check_version(version: int) -> None:
    if version < 0:
        raise InvalidInput([FieldViolation("version", f"must be >= 0 (got {version})")])
