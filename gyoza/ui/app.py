"""The dashboard's web application: pages, live fragments and actions.

Pages (full HTML): ``/fleet``, ``/runs``, ``/runs/{id}``, ``/definitions``,
``/definitions/{name}``. Each live part of a page has a fragment URL the page re-reads
(``/fleet/panel``, ``/runs/table``) or a server-sent event feed (``/runs/{id}/live``).
Actions are ``POST /api/...`` calls answering JSON; they must carry the header
``X-Gyoza-UI: 1``, which a page of another site cannot add without the browser asking
first, so another site cannot make a visitor's browser act here.

When the server cannot be reached a page says so and tries again by itself.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gyoza.client import (
    Agent,
    GyozaClientError,
    InvalidArgumentError,
    NotFoundError,
    RunFilter,
)
from gyoza.models.op_run import OpRun
from gyoza.models.resources import OpRunState
from gyoza.ui import actions, views
from gyoza.ui.gateway import Gateway
from gyoza.ui.live import RunFeed

__all__ = ["ACTION_HEADER", "create_app", "template_environment"]

#: Header every action request must carry (see the module's docstring).
ACTION_HEADER = "X-Gyoza-UI"
DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 200
#: Refresh periods of the polled parts of the pages, in milliseconds.
FLEET_REFRESH_MS = 2000
RUNS_REFRESH_MS = 3000

_STATES = [s.value for s in OpRunState]
_TEXT_FILTERS = ("definition", "image", "created_after", "created_before")

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def template_environment() -> jinja2.Environment:
    """The Jinja2 environment of the pages: the package's templates, HTML autoescaped,
    undefined names an error."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gyoza.ui", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["mb"] = views.format_mb
    env.filters["urlencode_query"] = lambda items: urllib.parse.urlencode(items, doseq=True)
    return env


def create_app(gateway: Gateway, *, close_gateway: bool = True) -> Starlette:
    """The Starlette application of the dashboard over *gateway*.

    With *close_gateway*, the gateway (and its client) is closed when the app shuts down.
    """
    pages = _Pages(gateway, template_environment())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_gateway:
                gateway.close()

    routes = [
        Route("/", lambda request: RedirectResponse("/fleet", status_code=307)),
        Route("/fleet", pages.fleet),
        Route("/fleet/panel", pages.fleet_panel),
        Route("/runs", pages.runs),
        Route("/runs/table", pages.runs_table),
        Route("/runs/{run_id}", pages.run),
        Route("/runs/{run_id}/live", pages.run_live),
        Route("/definitions", pages.definitions),
        Route("/definitions/{name}", pages.definition),
        Route("/api/runs", pages.create_run, methods=["POST"]),
        Route("/api/runs/{run_id}/cancel", pages.cancel_run, methods=["POST"]),
        Route("/api/runs/{run_id}/retry", pages.retry_run, methods=["POST"]),
        Route("/api/runs/{run_id}/priority", pages.set_priority, methods=["POST"]),
        Route("/api/agents/{name}/drain", pages.drain_agent, methods=["POST"]),
        Route("/api/agents/{name}/undrain", pages.undrain_agent, methods=["POST"]),
        Route("/healthz", lambda request: Response("ok\n", media_type="text/plain")),
        Mount("/static", StaticFiles(packages=[("gyoza.ui", "static")]), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


class _Pages:
    """The request handlers; each reads from the server through the gateway."""

    def __init__(self, gateway: Gateway, templates: jinja2.Environment) -> None:
        self.gateway = gateway
        self.client = gateway.client
        self.templates = templates

    # -- rendering ------------------------------------------------------------------

    def render(self, template: str, **context: Any) -> str:
        return self.templates.get_template(template).render(
            server=self.gateway.target,
            undrain_available=actions.undrain_available(self.client),
            **context,
        )

    def page(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("retry", False)
        return HTMLResponse(self.render(template, **context), status_code=status_code)

    def unreachable(self, error: GyozaClientError, nav: str) -> HTMLResponse:
        code = 503 if error.code is grpc.StatusCode.UNAVAILABLE else 502
        return self.page(
            "error.html",
            status_code=code,
            nav=nav,
            title="Server unreachable",
            error=str(error),
            retry=True,
        )

    def fragment_error(self, error: GyozaClientError) -> HTMLResponse:
        """What a polled fragment answers while the server is away: the page keeps
        what it shows and says it is reconnecting."""
        return HTMLResponse(str(error), status_code=503)

    # -- fleet ----------------------------------------------------------------------

    async def _fleet_context(self) -> dict[str, Any]:
        agents: list[Agent] = await self.gateway.call(
            self.client.list_agents, include_disconnected=True
        )
        now = datetime.now(UTC)
        shown = [views.agent_view(a, now) for a in sorted(agents, key=lambda a: a.name)]
        pending = await self.gateway.call(
            self.client.list_runs, RunFilter(states=[OpRunState.PENDING]), page_size=100
        )
        return {
            "agents": shown,
            "summary": views.fleet_summary(shown),
            "pending": len(pending.items),
            "pending_more": bool(pending.next_page_token),
        }

    async def fleet(self, request: Request) -> Response:
        try:
            context = await self._fleet_context()
        except GyozaClientError as error:
            return self.unreachable(error, "fleet")
        return self.page(
            "fleet.html", nav="fleet", title="Fleet", refresh_ms=FLEET_REFRESH_MS, **context
        )

    async def fleet_panel(self, request: Request) -> Response:
        try:
            context = await self._fleet_context()
        except GyozaClientError as error:
            return self.fragment_error(error)
        return HTMLResponse(self.render("_fleet_panel.html", **context))

    # -- runs -----------------------------------------------------------------------

    async def _runs_context(self, request: Request) -> dict[str, Any]:
        query = _RunsQuery.from_request(request)
        page = await self.gateway.call(
            self.client.list_runs, query.filter, page_size=query.page_size, page_token=query.token
        )
        now = datetime.now(UTC)
        return {
            "query": query,
            "rows": [views.run_row(r, now) for r in page.items],
            "next_token": page.next_page_token,
        }

    async def runs(self, request: Request) -> Response:
        try:
            context = await self._runs_context(request)
        except ValueError as error:
            return self.page("error.html", 400, nav="runs", title="Bad filter", error=str(error))
        except GyozaClientError as error:
            if isinstance(error, InvalidArgumentError):
                return self.page(
                    "error.html", 400, nav="runs", title="Bad filter", error=str(error)
                )
            return self.unreachable(error, "runs")
        return self.page(
            "runs.html",
            nav="runs",
            title="Runs",
            states=_STATES,
            refresh_ms=RUNS_REFRESH_MS,
            **context,
        )

    async def runs_table(self, request: Request) -> Response:
        try:
            context = await self._runs_context(request)
        except ValueError as error:
            return HTMLResponse(str(error), status_code=400)
        except GyozaClientError as error:
            return self.fragment_error(error)
        return HTMLResponse(self.render("_runs_table.html", **context))

    # -- one run --------------------------------------------------------------------

    async def _run_fragments(self, run: OpRun) -> dict[str, str]:
        view = await self._run_view(run)
        return {
            "run-head": self.render("_run_head.html", run=view),
            "run-body": self.render("_run_body.html", run=view),
        }

    async def _run_view(self, run: OpRun) -> views.RunView:
        attempts = list(run.attempts)
        if run.current_attempt > 1:
            attempts = await self.gateway.call(self.client.list_attempts, run.id)
        return views.run_view(run, attempts)

    async def run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        try:
            run = await self.gateway.call(self.client.get_run, run_id)
            view = await self._run_view(run)
        except NotFoundError as error:
            return self.page("error.html", 404, nav="runs", title="No such run", error=str(error))
        except GyozaClientError as error:
            return self.unreachable(error, "runs")
        return self.page("run.html", nav="runs", title=f"Run {view.row.short_id}", run=view)

    async def run_live(self, request: Request) -> Response:
        feed = RunFeed(self.gateway, request.path_params["run_id"], self._run_fragments)
        return StreamingResponse(
            feed.events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- definitions ----------------------------------------------------------------

    async def definitions(self, request: Request) -> Response:
        token = request.query_params.get("page_token", "")
        try:
            page = await self.gateway.call(
                self.client.list_definitions, None, page_size=50, page_token=token
            )
        except GyozaClientError as error:
            if isinstance(error, InvalidArgumentError):
                return self.page(
                    "error.html", 400, nav="definitions", title="Bad page", error=str(error)
                )
            return self.unreachable(error, "definitions")
        return self.page(
            "definitions.html",
            nav="definitions",
            title="Definitions",
            definitions=page.items,
            next_token=page.next_page_token,
        )

    async def definition(self, request: Request) -> Response:
        name = request.path_params["name"]
        token = request.query_params.get("page_token", "")
        try:
            versions = await self.gateway.call(
                self.client.list_definitions, name, page_size=20, page_token=token
            )
            if not versions.items:
                raise NotFoundError(grpc.StatusCode.NOT_FOUND, f"no definition named {name!r}")
            chosen = versions.items[0]
            wanted = request.query_params.get("version", "")
            if wanted:
                chosen = await self.gateway.call(self.client.get_definition, name, int(wanted))
        except ValueError:
            return self.page(
                "error.html", 400, nav="definitions", title="Bad version", error="not a number"
            )
        except NotFoundError as error:
            return self.page(
                "error.html", 404, nav="definitions", title="No such definition", error=str(error)
            )
        except GyozaClientError as error:
            return self.unreachable(error, "definitions")
        return self.page(
            "definition.html",
            nav="definitions",
            title=name,
            name=name,
            versions=versions.items,
            next_token=versions.next_page_token,
            chosen=chosen,
            fields=views.input_fields(chosen),
        )

    # -- actions --------------------------------------------------------------------

    async def create_run(self, request: Request) -> Response:
        return await actions.guarded(request, self._create_run)

    async def _create_run(self, request: Request, form: Mapping[str, str]) -> JSONResponse:
        name = form.get("definition", "")
        version = int(form.get("version") or 0) or None
        definition = await self.gateway.call(self.client.get_definition, name, version)
        run = await self.gateway.call(
            self.client.create_run,
            definition=name,
            definition_version=definition.version,
            inputs=views.parse_form_inputs(definition, form),
            priority=_whole(form.get("priority") or "0", "priority"),
        )
        return actions.done(f"created run {run.id}", url=f"/runs/{run.id}")

    async def cancel_run(self, request: Request) -> Response:
        async def cancel(request: Request, form: Mapping[str, str]) -> JSONResponse:
            run = await self.gateway.call(
                self.client.cancel_run, request.path_params["run_id"], "cancelled from gyoza ui"
            )
            if run.state is OpRunState.CANCELLED:
                return actions.done("cancelled")
            return actions.done("cancel requested: the agent is stopping it")

        return await actions.guarded(request, cancel)

    async def retry_run(self, request: Request) -> Response:
        async def retry(request: Request, form: Mapping[str, str]) -> JSONResponse:
            run = await self.gateway.call(self.client.retry_run, request.path_params["run_id"])
            return actions.done(f"attempt {run.current_attempt} is pending", url=f"/runs/{run.id}")

        return await actions.guarded(request, retry)

    async def set_priority(self, request: Request) -> Response:
        async def prioritise(request: Request, form: Mapping[str, str]) -> JSONResponse:
            priority = _whole(form.get("priority", ""), "priority")
            run = await self.gateway.call(
                self.client.set_priority, request.path_params["run_id"], priority
            )
            return actions.done(f"priority is {run.priority}")

        return await actions.guarded(request, prioritise)

    async def drain_agent(self, request: Request) -> Response:
        async def drain(request: Request, form: Mapping[str, str]) -> JSONResponse:
            agent = await self.gateway.call(self.client.drain_agent, request.path_params["name"])
            return actions.done(f"{agent.name} is {agent.state.value.lower()}")

        return await actions.guarded(request, drain)

    async def undrain_agent(self, request: Request) -> Response:
        async def undrain(request: Request, form: Mapping[str, str]) -> JSONResponse:
            agent = await actions.undrain(self.gateway, request.path_params["name"])
            return actions.done(f"{agent.name} is {agent.state.value.lower()}")

        return await actions.guarded(request, undrain)


class _RunsQuery:
    """The runs page's filters and page, read from (and written back to) its URL."""

    def __init__(
        self,
        states: list[str],
        definition: str,
        image: str,
        created_after: str,
        created_before: str,
        page_size: int,
        token: str,
    ) -> None:
        self.states = states
        self.definition = definition
        self.image = image
        self.created_after = created_after
        self.created_before = created_before
        self.page_size = page_size
        self.token = token

    @classmethod
    def from_request(cls, request: Request) -> _RunsQuery:
        """Raises ValueError for a state, time or page size that does not parse."""
        params = request.query_params
        states = [s for s in params.getlist("state") if s]
        for state in states:
            if state not in _STATES:
                raise ValueError(f"unknown state {state!r}; states: {', '.join(_STATES)}")
        size = _whole(params.get("page_size") or str(DEFAULT_PAGE_SIZE), "page_size")
        return cls(
            states=states,
            definition=params.get("definition", "").strip(),
            image=params.get("image", "").strip(),
            created_after=params.get("created_after", "").strip(),
            created_before=params.get("created_before", "").strip(),
            page_size=max(1, min(MAX_PAGE_SIZE, size)),
            token=params.get("page_token", ""),
        )

    @property
    def filter(self) -> RunFilter:
        return RunFilter(
            states=[OpRunState(s) for s in self.states],
            definition=self.definition or None,
            image=self.image or None,
            created_after=_utc_time(self.created_after, "created_after"),
            created_before=_utc_time(self.created_before, "created_before"),
        )

    def items(self, page_token: str = "") -> list[tuple[str, str]]:
        """The query string's items, with *page_token* for the page."""
        items = [("state", s) for s in self.states]
        for key in _TEXT_FILTERS:
            value = getattr(self, key)
            if value:
                items.append((key, value))
        if self.page_size != DEFAULT_PAGE_SIZE:
            items.append(("page_size", str(self.page_size)))
        if page_token:
            items.append(("page_token", page_token))
        return items

    @property
    def filtered(self) -> bool:
        """Whether any filter is set (the page size is no filter)."""
        return bool(self.states) or any(getattr(self, key) for key in _TEXT_FILTERS)


def _utc_time(text: str, name: str) -> datetime | None:
    """A time typed in the filter form (``datetime-local``: no zone, taken as UTC)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name}: not a time: {text!r} (use YYYY-MM-DDTHH:MM)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _whole(text: str, name: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise actions.FormError(name, "must be a whole number") from None
