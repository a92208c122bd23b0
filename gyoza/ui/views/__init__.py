"""What the dashboard's templates show: plain values built from the client's objects.

Every figure a page shows (percentages, ages, sizes, labels) is computed here, so the
templates only lay values out and the tests can check them without a browser:
:mod:`.fleet` (the fleet page), :mod:`.runs` (the runs list and the run page),
:mod:`.run_form` (the definition page's form), :mod:`.formatting`.
"""

from __future__ import annotations

from gyoza.ui.views.fleet import (
    AgentView,
    BarView,
    FleetSummary,
    GpuView,
    agent_view,
    fleet_summary,
)
from gyoza.ui.views.formatting import format_age, format_duration, format_mb, pretty_json
from gyoza.ui.views.run_form import InputField, input_fields, parse_form_inputs
from gyoza.ui.views.runs import (
    TIMELINE_LIMIT,
    AttemptView,
    EventView,
    RunRow,
    RunView,
    SummaryItem,
    attempt_view,
    pending_reason,
    run_row,
    run_view,
)

__all__ = [
    "TIMELINE_LIMIT",
    "AgentView",
    "AttemptView",
    "BarView",
    "EventView",
    "FleetSummary",
    "GpuView",
    "InputField",
    "RunRow",
    "RunView",
    "SummaryItem",
    "agent_view",
    "attempt_view",
    "fleet_summary",
    "format_age",
    "format_duration",
    "format_mb",
    "input_fields",
    "parse_form_inputs",
    "pending_reason",
    "pretty_json",
    "run_row",
    "run_view",
]
