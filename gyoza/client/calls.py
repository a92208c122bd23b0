"""The API's calls as the wire has them: plain arguments in, the response message out.

:class:`ApiCalls` builds each request, sends it with the client's credentials and
deadline, and translates a refusal into a :class:`~gyoza.client.errors.GyozaClientError`.
It is what :class:`~gyoza.client.Client` converts to domain objects, and what the
``gyoza`` command prints as JSON (the API's messages, exactly as the server sent them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import grpc

from gyoza import mapping
from gyoza.api.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    definition_service_pb2,
    definition_service_pb2_grpc,
    op_run_service_pb2,
    op_run_service_pb2_grpc,
)
from gyoza.client.errors import error_from_rpc
from gyoza.models.op_definition import OpDefinition
from gyoza.models.resources import Constraints, EventDelivery, OpRunState, RetryPolicy

__all__ = ["ApiCalls", "RunFilter"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@dataclass(frozen=True)
class RunFilter:
    """Filters of a run listing; they combine with AND.

    Parameters
    ----------
    states : Sequence[OpRunState]
        Only runs in one of these states; empty means any.
    definition : str | None
        Only runs created from this definition.
    image : str | None
        Only runs of this image.
    created_after, created_before : datetime | None
        Only runs created at or after / before these (aware) times.
    oldest_first : bool
        Oldest first instead of newest first.
    """

    states: Sequence[OpRunState] = field(default_factory=tuple)
    definition: str | None = None
    image: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    oldest_first: bool = False


class ApiCalls:
    """One method per RPC, over one channel.

    Unary calls have the client's deadline; streams have none unless given, and a
    stream the caller stops reading is cancelled on the server too.

    Parameters
    ----------
    channel : grpc.Channel
        The channel to the server.
    metadata : tuple[tuple[str, str], ...]
        Sent with every call (the API key).
    timeout : float | None
        Deadline in seconds of each unary call (``None``: none).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: tuple[tuple[str, str], ...] = (),
        timeout: float | None = 30.0,
    ) -> None:
        self.timeout = timeout
        self._metadata = metadata
        self._definitions = definition_service_pb2_grpc.DefinitionServiceStub(channel)
        self._runs = op_run_service_pb2_grpc.OpRunServiceStub(channel)
        self._agents = agent_service_pb2_grpc.AgentServiceStub(channel)

    # -- definitions ----------------------------------------------------------------------

    def create_op_definition(
        self, definition: OpDefinition
    ) -> definition_service_pb2.CreateOpDefinitionResponse:
        """``CreateOpDefinition``."""
        request = definition_service_pb2.CreateOpDefinitionRequest(
            op_definition=mapping.definition_to_proto(definition)
        )
        return self._call(self._definitions.CreateOpDefinition, request)

    def get_op_definition(
        self, name: str, version: int | None = None
    ) -> definition_service_pb2.GetOpDefinitionResponse:
        """``GetOpDefinition``; the latest version when *version* is ``None``."""
        request = definition_service_pb2.GetOpDefinitionRequest(name=name, version=version or 0)
        return self._call(self._definitions.GetOpDefinition, request)

    def list_op_definitions(
        self, name: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> definition_service_pb2.ListOpDefinitionsResponse:
        """``ListOpDefinitions``: one page."""
        request = definition_service_pb2.ListOpDefinitionsRequest(
            name=name or "", page_size=page_size, page_token=page_token
        )
        return self._call(self._definitions.ListOpDefinitions, request)

    def delete_op_definition(
        self, name: str, version: int | None = None
    ) -> definition_service_pb2.DeleteOpDefinitionResponse:
        """``DeleteOpDefinition``: one version, or every version when *version* is None."""
        request = definition_service_pb2.DeleteOpDefinitionRequest(name=name, version=version or 0)
        return self._call(self._definitions.DeleteOpDefinition, request)

    # -- runs -----------------------------------------------------------------------------

    def create_op_run(
        self,
        *,
        definition: str | None = None,
        definition_version: int | None = None,
        image: str | None = None,
        inputs: Mapping[str, Any] | None = None,
        priority: int = 0,
        constraints: Constraints | None = None,
        retry_policy: RetryPolicy | None = None,
        event_delivery: EventDelivery | None = None,
        request_id: str | None = None,
    ) -> op_run_service_pb2.CreateOpRunResponse:
        """``CreateOpRun``; settings left ``None`` are left unset (the definition's or
        the server's apply).

        Raises
        ------
        TypeError, ValueError
            *inputs* hold something that is not a JSON value.
        """
        request = op_run_service_pb2.CreateOpRunRequest(
            op_definition=definition or "",
            op_definition_version=definition_version or 0,
            image=image or "",
            inputs=mapping.struct_to_proto(inputs or {}, "inputs"),
            priority=priority,
            request_id=request_id or "",
        )
        if constraints is not None:
            request.constraints.CopyFrom(mapping.constraints_to_proto(constraints))
        if retry_policy is not None:
            request.retry_policy.CopyFrom(mapping.retry_policy_to_proto(retry_policy))
        if event_delivery is not None:
            request.event_delivery.CopyFrom(mapping.event_delivery_to_proto(event_delivery))
        return self._call(self._runs.CreateOpRun, request)

    def get_op_run(self, run_id: str) -> op_run_service_pb2.GetOpRunResponse:
        """``GetOpRun``."""
        return self._call(self._runs.GetOpRun, op_run_service_pb2.GetOpRunRequest(run_id=run_id))

    def list_op_runs(
        self, filters: RunFilter | None = None, page_size: int = 0, page_token: str = ""
    ) -> op_run_service_pb2.ListOpRunsResponse:
        """``ListOpRuns``: one page."""
        filters = filters or RunFilter()
        request = op_run_service_pb2.ListOpRunsRequest(
            page_size=page_size,
            page_token=page_token,
            states=[mapping.state_to_proto(s) for s in filters.states],
            op_definition=filters.definition or "",
            image=filters.image or "",
            oldest_first=filters.oldest_first,
        )
        if filters.created_after is not None:
            request.created_after.CopyFrom(mapping.timestamp_to_proto(filters.created_after))
        if filters.created_before is not None:
            request.created_before.CopyFrom(mapping.timestamp_to_proto(filters.created_before))
        return self._call(self._runs.ListOpRuns, request)

    def cancel_op_run(
        self, run_id: str, reason: str = ""
    ) -> op_run_service_pb2.CancelOpRunResponse:
        """``CancelOpRun``."""
        request = op_run_service_pb2.CancelOpRunRequest(run_id=run_id, reason=reason)
        return self._call(self._runs.CancelOpRun, request)

    def retry_op_run(self, run_id: str) -> op_run_service_pb2.RetryOpRunResponse:
        """``RetryOpRun``."""
        request = op_run_service_pb2.RetryOpRunRequest(run_id=run_id)
        return self._call(self._runs.RetryOpRun, request)

    def delete_op_run(self, run_id: str) -> op_run_service_pb2.DeleteOpRunResponse:
        """``DeleteOpRun``."""
        request = op_run_service_pb2.DeleteOpRunRequest(run_id=run_id)
        return self._call(self._runs.DeleteOpRun, request)

    def update_op_run_priority(
        self, run_id: str, priority: int
    ) -> op_run_service_pb2.UpdateOpRunPriorityResponse:
        """``UpdateOpRunPriority``."""
        request = op_run_service_pb2.UpdateOpRunPriorityRequest(run_id=run_id, priority=priority)
        return self._call(self._runs.UpdateOpRunPriority, request)

    def list_op_run_attempts(self, run_id: str) -> op_run_service_pb2.ListOpRunAttemptsResponse:
        """``ListOpRunAttempts``."""
        request = op_run_service_pb2.ListOpRunAttemptsRequest(run_id=run_id)
        return self._call(self._runs.ListOpRunAttempts, request)

    def list_op_run_events(
        self, run_id: str, attempt: int = 0, page_size: int = 0, page_token: str = ""
    ) -> op_run_service_pb2.ListOpRunEventsResponse:
        """``ListOpRunEvents``: one page."""
        request = op_run_service_pb2.ListOpRunEventsRequest(
            run_id=run_id, attempt=attempt, page_size=page_size, page_token=page_token
        )
        return self._call(self._runs.ListOpRunEvents, request)

    def watch_op_run(
        self, run_id: str, after_sequence: int = 0, *, timeout: float | None = None
    ) -> Iterator[op_run_service_pb2.WatchOpRunResponse]:
        """``WatchOpRun``'s messages as they come."""
        request = op_run_service_pb2.WatchOpRunRequest(run_id=run_id, after_sequence=after_sequence)
        return self._stream(self._runs.WatchOpRun, request, timeout)

    def subscribe_events(
        self,
        topic: str,
        after_offset: int = 0,
        *,
        from_latest: bool = False,
        max_batch: int = 0,
        timeout: float | None = None,
    ) -> Iterator[op_run_service_pb2.SubscribeEventsResponse]:
        """``SubscribeEvents``'s messages as they come (with *max_batch* above 1, a
        message may carry further events in ``more``)."""
        request = op_run_service_pb2.SubscribeEventsRequest(
            topic=topic, after_offset=after_offset, from_latest=from_latest, max_batch=max_batch
        )
        return self._stream(self._runs.SubscribeEvents, request, timeout)

    def get_op_run_logs(
        self,
        run_id: str,
        attempt: int = 0,
        follow: bool = False,
        after_line: int = 0,
        *,
        timeout: float | None = None,
    ) -> Iterator[op_run_service_pb2.GetOpRunLogsResponse]:
        """``GetOpRunLogs``'s messages as they come."""
        request = op_run_service_pb2.GetOpRunLogsRequest(
            run_id=run_id, attempt=attempt, follow=follow, after_line=after_line
        )
        return self._stream(self._runs.GetOpRunLogs, request, timeout)

    # -- agents ---------------------------------------------------------------------------

    def list_agents(
        self, include_disconnected: bool = False, *, page_size: int = 0, page_token: str = ""
    ) -> agent_service_pb2.ListAgentsResponse:
        """``ListAgents``: one page."""
        request = agent_service_pb2.ListAgentsRequest(
            include_disconnected=include_disconnected, page_size=page_size, page_token=page_token
        )
        return self._call(self._agents.ListAgents, request)

    def list_all_agents(
        self, include_disconnected: bool = False
    ) -> agent_service_pb2.ListAgentsResponse:
        """``ListAgents`` page after page: every agent in one response."""
        whole = agent_service_pb2.ListAgentsResponse()
        token = ""
        while True:
            page = self.list_agents(include_disconnected, page_token=token)
            whole.agents.extend(page.agents)
            token = page.next_page_token
            if not token:
                return whole

    def drain_agent(self, name: str) -> agent_service_pb2.DrainAgentResponse:
        """``DrainAgent``."""
        return self._call(self._agents.DrainAgent, agent_service_pb2.DrainAgentRequest(name=name))

    def undrain_agent(self, name: str) -> agent_service_pb2.UndrainAgentResponse:
        """``UndrainAgent``."""
        request = agent_service_pb2.UndrainAgentRequest(name=name)
        return self._call(self._agents.UndrainAgent, request)

    # -- transport ------------------------------------------------------------------------

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error

    def _stream(
        self,
        method: grpc.UnaryStreamMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None = None,
    ) -> Iterator[_Response]:
        call = method(request, metadata=self._metadata, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            # Ends the stream on the server too when the caller stops early.
            call.cancel()
