"""The dashboard's view values: what each page shows, computed from the client's objects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gyoza.client import Agent, AgentGpu, AgentRun, AgentState
from gyoza.models.op_definition import InputSpec, InputType, OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import OpRunState, PendingReason, PendingReasonCode
from gyoza.ui import views

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def test_durations_ages_and_sizes_read_as_people_say_them() -> None:
    assert views.format_duration(None) == "—"
    assert views.format_duration(850) == "850 ms"
    assert views.format_duration(12_340) == "12.3 s"
    assert views.format_duration(245_000) == "4 m 05 s"
    assert views.format_duration(7_800_000) == "2 h 10 m"
    assert views.format_age(NOW - timedelta(seconds=2), NOW) == "just now"
    assert views.format_age(NOW - timedelta(seconds=42), NOW) == "42 s ago"
    assert views.format_age(NOW - timedelta(hours=3), NOW) == "3 h ago"
    assert views.format_mb(0) == "0"
    assert views.format_mb(512) == "512 MB"
    assert views.format_mb(24576) == "24 GB"
    assert views.format_mb(1536) == "1.5 GB"
    assert views.format_mb(1024 * 1024 * 1.5) == "1.5 TB"


def test_agent_view_puts_runs_on_their_gpus_and_bars_in_tones() -> None:
    agent = Agent(
        name="node",
        state=AgentState.DRAINING,
        cpu=16,
        ram_mb=65536,
        cpu_reserved=14.5,
        ram_reserved_mb=8192,
        gpus=(
            AgentGpu(0, "GPU-a", "H100", 81920, 0, 81920, 81920, 1, True),
            AgentGpu(1, "GPU-b", "H100", 81920, 81920, 0, 81920, 0, False, "XID 79"),
        ),
        runs=(AgentRun("run_1", 1, (0,)), AgentRun("run_2", 1, ())),
        labels={"zone": "b", "pool": "x"},
        last_seen_time=NOW - timedelta(seconds=10),
    )
    view = views.agent_view(agent, NOW)
    assert view.state == "DRAINING" and view.can_undrain and not view.can_drain
    assert list(view.labels) == ["pool", "zone"]
    assert (view.cpu.percent, view.cpu.tone) == (91, "full")
    assert (view.ram.percent, view.ram.tone) == (12, "calm")
    first, second = view.gpus
    assert first.vram.label == "80 GB of 80 GB" and first.run_ids == ("run_1",)
    assert first.free_label == "0 free"
    assert not second.healthy and second.health_reason == "XID 79"
    assert view.other_run_ids == ("run_2",)
    assert view.last_seen == "10 s ago"

    summary = views.fleet_summary([view])
    assert (summary.agents_live, summary.gpus, summary.gpus_busy, summary.gpus_unhealthy) == (
        1,
        2,
        1,
        1,
    )
    assert summary.vram.percent == 50


def test_a_pending_run_tells_the_servers_reason_or_its_backoff() -> None:
    run = OpRun.create(image="busybox")
    assert views.pending_reason(run) is None
    run.next_retry_at = NOW
    assert views.pending_reason(run) == "retry backoff until 12:00:00 UTC"
    run.pending_reason = PendingReason(
        PendingReasonCode.INSUFFICIENT_VRAM, "needs 30000 MB VRAM on one GPU"
    )
    assert views.pending_reason(run) == "needs 30000 MB VRAM on one GPU"
    run.set_state(OpRunState.ASSIGNED)
    assert views.pending_reason(run) is None


def test_run_row_and_view_of_a_new_run() -> None:
    run = OpRun.create(image="busybox", inputs={"n": 1}, priority=4)
    row = views.run_row(run, run.created_at + timedelta(minutes=5))
    assert (row.state, row.tone, row.what, row.priority, row.age) == (
        "PENDING",
        "waiting",
        "busybox",
        4,
        "5 m ago",
    )
    assert row.active and row.short_id == run.id.removeprefix("run_")[:12]
    view = views.run_view(run, [])
    assert view.can_cancel and not view.can_retry
    assert view.inputs_json == '{\n  "n": 1\n}'
    assert [a.number for a in view.attempts] == [1]


def test_the_run_form_sends_typed_values_and_leaves_bad_ones_to_the_server() -> None:
    definition = OpDefinition(
        name="op",
        image="busybox",
        inputs=[
            InputSpec("n", InputType.INT, required=True),
            InputSpec("rate", InputType.FLOAT),
            InputSpec("on", InputType.BOOL),
            InputSpec("opts", InputType.OBJECT, default={"a": 1}),
            InputSpec("name", InputType.STRING),
        ],
    )
    form = {"n": "3", "rate": "0.5", "on": "true", "opts": '{"b": 2}', "name": " x "}
    assert views.parse_form_inputs(definition, form) == {
        "n": 3,
        "rate": 0.5,
        "on": True,
        "opts": {"b": 2},
        "name": "x",
    }
    assert views.parse_form_inputs(definition, {"n": "three", "opts": "{", "on": ""}) == {
        "n": "three",
        "opts": "{",
    }
    fields = views.input_fields(definition, errors={"n": "is required (INT)"})
    assert [(f.name, f.widget) for f in fields] == [
        ("n", "number"),
        ("rate", "number"),
        ("on", "bool"),
        ("opts", "json"),
        ("name", "text"),
    ]
    assert fields[0].error == "is required (INT)" and fields[0].placeholder == "required"
    assert fields[3].placeholder == 'default: {"a": 1}'


def test_the_fleet_panel_shows_a_quarantined_gpu_and_undrain_where_available() -> None:
    from gyoza.ui.app import template_environment

    agent = Agent(
        name="node",
        state=AgentState.DRAINING,
        cpu=8,
        ram_mb=8192,
        cpu_reserved=0,
        ram_reserved_mb=0,
        gpus=(AgentGpu(0, "GPU-a", "A100", 40960, 40960, 0, 40960, 0, False, "XID 48"),),
    )
    shown = [views.agent_view(agent, NOW)]
    panel = template_environment().get_template("_fleet_panel.html")

    def render(undrain_available: bool) -> str:
        return panel.render(
            agents=shown,
            summary=views.fleet_summary(shown),
            pending=0,
            pending_more=False,
            server="127.0.0.1:50051",
            undrain_available=undrain_available,
        )

    html = render(False)
    assert "quarantined" in html and "XID 48" in html
    assert "1 unhealthy" in html
    assert "/undrain" not in html and "/drain" not in html
    assert 'data-action="/api/agents/node/undrain"' in render(True)
