"""``gyoza.api.v1.OpRunService``: create, read, watch and steer runs.

Thin: requests are mapped to the domain, changes go through the run controller (the
only code that changes runs), reads come from the controller or the store, and the
streams are in :mod:`gyoza.server.services.run_streams`. Errors propagate to the error
interceptor, which picks their status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from gyoza import mapping
from gyoza.api.v1 import op_run_service_pb2 as pb
from gyoza.api.v1 import op_run_service_pb2_grpc
from gyoza.models.errors import FieldViolation, InvalidInput, NotFound
from gyoza.models.op_run import OpRun, RunRequest
from gyoza.models.resources import Constraints, EventDelivery, RetryPolicy
from gyoza.server.config import MAX_JSON_BYTES
from gyoza.server.control import RunController
from gyoza.server.hub import Hub
from gyoza.server.limits import check_json_size
from gyoza.server.services import request_checks, run_streams
from gyoza.server.store import paging
from gyoza.server.store.protocol import RunStore
from gyoza.server.store.records import RunFilter

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

DEFAULT_RUNS_PAGE = 50
MAX_RUNS_PAGE = 500
DEFAULT_EVENTS_PAGE = 500
MAX_EVENTS_PAGE = 5000
MAX_REQUEST_ID_LENGTH = 200
MAX_TOPIC_BATCH = 1000
"""Most events a SubscribeEvents request may ask for per response (`max_batch`)."""

# Domain field names that differ from the request's.
_FIELD_NAMES = {
    "constraints.timeout_s": "constraints.timeout_seconds",
    "retry_policy.initial_delay_s": "retry_policy.initial_delay_seconds",
    "retry_policy.max_delay_s": "retry_policy.max_delay_seconds",
}


def _request_field(violation: FieldViolation) -> FieldViolation:
    name = _FIELD_NAMES.get(violation.field, violation.field)
    return FieldViolation(name, violation.description)


class OpRunServiceServicer(op_run_service_pb2_grpc.OpRunServiceServicer):
    """Serves runs to clients.

    Parameters
    ----------
    controller : RunController
        Applies every change to runs.
    store : RunStore
        Reads of definitions, listings, events, logs and the topic log.
    hub : Hub
        Live changes for the streams.
    max_json_bytes : int
        Largest run inputs accepted, as JSON.
    """

    def __init__(
        self,
        controller: RunController,
        store: RunStore,
        hub: Hub,
        *,
        max_json_bytes: int = MAX_JSON_BYTES,
    ) -> None:
        self.controller = controller
        self.store = store
        self.hub = hub
        self.max_json_bytes = max_json_bytes

    # -- create and read ---------------------------------------------------------------

    async def CreateOpRun(
        self, request: pb.CreateOpRunRequest, context: Context
    ) -> pb.CreateOpRunResponse:
        """Create a run from a definition (inputs checked, defaults filled) or an image."""
        inputs = mapping.struct_from_proto(request.inputs)
        check_json_size("inputs", inputs, self.max_json_bytes)
        asked = RunRequest(
            op_definition=request.op_definition.strip(),
            op_definition_version=request.op_definition_version or None,
            image=request.image.strip(),
            inputs=inputs,
        )
        if request.request_id:
            # A retried create: answer with the first run even if the definition has
            # changed or gone since, as long as the request is the same.
            first = await self.controller.find_request(request.request_id, asked)
            if first is not None:
                return pb.CreateOpRunResponse(op_run=mapping.run_to_proto(first), existing=True)
        run = await self._new_run(request, inputs)
        created = await self.controller.create_run(run, asked)
        # A concurrent create with the same request_id may have won the race.
        return pb.CreateOpRunResponse(
            op_run=mapping.run_to_proto(created), existing=created.id != run.id
        )

    async def _new_run(self, request: pb.CreateOpRunRequest, inputs: dict[str, Any]) -> OpRun:
        """The run the request asks for, or one InvalidInput naming every problem."""
        violations: list[FieldViolation] = []
        name = request.op_definition.strip()
        image = request.image.strip()
        if bool(name) == bool(image):
            text = (
                "give either op_definition or image, not both"
                if name
                else "give op_definition (a definition's name) or image (an ad-hoc run)"
            )
            violations += [FieldViolation("op_definition", text), FieldViolation("image", text)]
        if request.op_definition_version < 0:
            violations.append(FieldViolation("op_definition_version", "must be >= 0"))
        if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
            violations.append(
                FieldViolation("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
            )
        constraints: Constraints | None = None
        if request.HasField("constraints"):
            constraints = mapping.constraints_from_proto(request.constraints)
        retry_policy: RetryPolicy | None = None
        if request.HasField("retry_policy"):
            try:
                retry_policy = mapping.retry_policy_from_proto(request.retry_policy)
            except InvalidInput as error:
                violations.extend(error.violations)
        delivery: EventDelivery | None = None
        if request.HasField("event_delivery"):
            delivery = mapping.event_delivery_from_proto(request.event_delivery)
        run: OpRun | None = None
        if bool(name) != bool(image):
            try:
                if name:
                    definition = await self.store.get_definition(
                        name, request.op_definition_version or None
                    )
                    run = definition.create_run(
                        inputs,
                        priority=request.priority,
                        constraints=constraints,
                        retry_policy=retry_policy,
                        event_delivery=delivery,
                        request_id=request.request_id or None,
                    )
                else:
                    run = OpRun.create(
                        image=image,
                        priority=request.priority,
                        inputs=inputs,
                        constraints=constraints,
                        retry_policy=retry_policy,
                        event_delivery=delivery,
                        request_id=request.request_id or None,
                    )
            except InvalidInput as error:
                violations.extend(_request_field(v) for v in error.violations)
        if violations or run is None:
            raise InvalidInput(violations)
        return run

    async def GetOpRun(self, request: pb.GetOpRunRequest, context: Context) -> pb.GetOpRunResponse:
        """The run with its current attempt."""
        run = await self.controller.get_run(request_checks.required(request.run_id, "run_id"))
        return pb.GetOpRunResponse(
            op_run=mapping.run_to_proto(run, pending_reason=self.controller.pending_reason(run.id))
        )

    async def ListOpRuns(
        self, request: pb.ListOpRunsRequest, context: Context
    ) -> pb.ListOpRunsResponse:
        """Runs matching the filters, newest first unless asked, one page."""
        size = request_checks.page_size(
            request.page_size, default=DEFAULT_RUNS_PAGE, maximum=MAX_RUNS_PAGE
        )
        violations: list[FieldViolation] = []
        states = []
        for index, value in enumerate(request.states):
            try:
                states.append(mapping.state_from_proto(value, f"states[{index}]"))
            except InvalidInput as error:
                violations.extend(error.violations)
        created_after = mapping.optional_timestamp_from_proto(request, "created_after")
        created_before = mapping.optional_timestamp_from_proto(request, "created_before")
        if created_after and created_before and created_after >= created_before:
            violations.append(FieldViolation("created_before", "must be later than created_after"))
        if violations:
            raise InvalidInput(violations)
        run_filter = RunFilter(
            states=tuple(dict.fromkeys(states)),
            op_definition=request.op_definition or None,
            image=request.image or None,
            created_after=created_after,
            created_before=created_before,
            oldest_first=request.oldest_first,
        )
        runs, token = await self.store.list_runs(
            run_filter, page_size=size, page_token=request.page_token
        )
        # The page's runs come without their events: their sequences are counted apart.
        sequences = await self.store.event_counts([run.id for run in runs])
        response = pb.ListOpRunsResponse()
        size = 0
        for index, run in enumerate(runs):
            message = mapping.run_to_proto(
                run,
                events=False,
                event_sequence=sequences.get(run.id, 0),
                pending_reason=self.controller.pending_reason(run.id),
            )
            size += message.ByteSize() + 8
            if index and size > request_checks.MAX_PAGE_BYTES:
                # Fewer runs, and a token that goes on after the last one sent.
                last = runs[index - 1]
                token = paging.runs_token(run_filter, last.created_at, last.id)
                break
            response.op_runs.append(message)
        response.next_page_token = token
        return response

    async def ListOpRunAttempts(
        self, request: pb.ListOpRunAttemptsRequest, context: Context
    ) -> pb.ListOpRunAttemptsResponse:
        """Every attempt of the run, first to last, with its events."""
        run = await self.controller.get_run(request_checks.required(request.run_id, "run_id"))
        return pb.ListOpRunAttemptsResponse(
            attempts=[mapping.attempt_to_proto(attempt) for attempt in run.attempts]
        )

    async def ListOpRunEvents(
        self, request: pb.ListOpRunEventsRequest, context: Context
    ) -> pb.ListOpRunEventsResponse:
        """The run's events in order, of one attempt or of all, one page."""
        run_id = request_checks.required(request.run_id, "run_id")
        if request.attempt < 0:
            raise InvalidInput([FieldViolation("attempt", "must be >= 0")])
        size = request_checks.page_size(
            request.page_size, default=DEFAULT_EVENTS_PAGE, maximum=MAX_EVENTS_PAGE
        )
        run = await self.controller.get_run(run_id)
        if request.attempt > run.current_attempt:
            raise NotFound(f"run {run_id} has no attempt {request.attempt}")
        listing = f"{run_id}/{request.attempt}"
        position = paging.decode_token(request.page_token, "events", listing)
        after = (0, 0)
        if position is not None:
            if len(position) != 2:
                raise ValueError("invalid page token")
            after = (paging.position_int(position[0]), paging.position_int(position[1]))
        found = await self.store.list_events(
            run_id, attempt=request.attempt or None, after=after, limit=size + 1
        )
        page = found[:size]
        more = len(found) > size
        response = pb.ListOpRunEventsResponse()
        total = 0
        for index, (attempt, entry) in enumerate(page):
            message = mapping.event_to_proto(entry, attempt)
            total += message.ByteSize() + 8
            if index and total > request_checks.MAX_PAGE_BYTES:
                page, more = page[:index], True
                break
            response.events.append(message)
        if more:
            last_attempt, last_event = page[-1]
            response.next_page_token = paging.encode_token(
                "events", listing, [last_attempt, last_event.seq]
            )
        return response

    # -- changes -----------------------------------------------------------------------

    async def CancelOpRun(
        self, request: pb.CancelOpRunRequest, context: Context
    ) -> pb.CancelOpRunResponse:
        """Cancel: a PENDING run at once, an assigned one through its agent."""
        run_id = request_checks.required(request.run_id, "run_id")
        run = await self.controller.cancel_run(run_id, request.reason)
        return pb.CancelOpRunResponse(op_run=mapping.run_to_proto(run))

    async def DeleteOpRun(
        self, request: pb.DeleteOpRunRequest, context: Context
    ) -> pb.DeleteOpRunResponse:
        """Delete a finished run with its events, logs and topic records."""
        run_id = request_checks.required(request.run_id, "run_id")
        await self.controller.delete_run(run_id)
        return pb.DeleteOpRunResponse(run_id=run_id)

    async def RetryOpRun(
        self, request: pb.RetryOpRunRequest, context: Context
    ) -> pb.RetryOpRunResponse:
        """A new attempt of a FAILED or CANCELLED run."""
        run = await self.controller.retry_run(request_checks.required(request.run_id, "run_id"))
        return pb.RetryOpRunResponse(op_run=mapping.run_to_proto(run))

    async def UpdateOpRunPriority(
        self, request: pb.UpdateOpRunPriorityRequest, context: Context
    ) -> pb.UpdateOpRunPriorityResponse:
        """A new priority; a pending run moves in the queue at once."""
        run_id = request_checks.required(request.run_id, "run_id")
        run = await self.controller.set_priority(run_id, request.priority)
        return pb.UpdateOpRunPriorityResponse(op_run=mapping.run_to_proto(run))

    # -- streams -----------------------------------------------------------------------

    async def WatchOpRun(
        self, request: pb.WatchOpRunRequest, context: Context
    ) -> AsyncIterator[pb.WatchOpRunResponse]:
        """The run's snapshot, then every change as it is committed, until it is over."""
        run_id = request_checks.required(request.run_id, "run_id")
        if request.after_sequence < 0:
            raise InvalidInput([FieldViolation("after_sequence", "must be >= 0")])
        async for response in run_streams.watch_run(
            self.store, self.hub, run_id, request.after_sequence
        ):
            yield response

    async def SubscribeEvents(
        self, request: pb.SubscribeEventsRequest, context: Context
    ) -> AsyncIterator[pb.SubscribeEventsResponse]:
        """Every event on the topic, from the durable log, then live; stays open.

        The response headers are sent as soon as the subscription is in place.
        """
        topic = request_checks.required(request.topic, "topic")
        if request.after_offset < 0:
            raise InvalidInput([FieldViolation("after_offset", "must be >= 0")])
        if not 0 <= request.max_batch <= MAX_TOPIC_BATCH:
            raise InvalidInput(
                [FieldViolation("max_batch", f"must be between 0 and {MAX_TOPIC_BATCH}")]
            )
        async for response in run_streams.subscribe_topic(
            self.store,
            self.hub,
            topic,
            request.after_offset,
            request.from_latest,
            lambda: context.send_initial_metadata(()),
            max_batch=request.max_batch,
        ):
            yield response

    async def GetOpRunLogs(
        self, request: pb.GetOpRunLogsRequest, context: Context
    ) -> AsyncIterator[pb.GetOpRunLogsResponse]:
        """An attempt's log lines; with follow, new ones until the attempt ends.

        With follow, the response headers are sent as soon as the follower is subscribed.
        """
        run_id = request_checks.required(request.run_id, "run_id")
        violations = []
        if request.attempt < 0:
            violations.append(FieldViolation("attempt", "must be >= 0"))
        if request.after_line < 0:
            violations.append(FieldViolation("after_line", "must be >= 0"))
        if violations:
            raise InvalidInput(violations)
        run = await self.controller.get_run(run_id)
        attempt = request.attempt or run.current_attempt
        if attempt > run.current_attempt:
            raise NotFound(f"run {run_id} has no attempt {attempt}")
        async for response in run_streams.read_logs(
            self.controller,
            self.store,
            self.hub,
            run_id,
            attempt,
            request.after_line,
            request.follow,
            lambda: context.send_initial_metadata(()),
        ):
            yield response
