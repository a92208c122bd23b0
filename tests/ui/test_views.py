"""The dashboard's pages, feeds and actions against a real server and scripted agent."""

from __future__ import annotations

import re
import time

import httpx
from ui_stack import Stack, sse_events, wait_for

from gyoza.models.op_definition import InputSpec, InputType, OpDefinition
from gyoza.models.resources import Constraints, OpRunState, RetryPolicy


def test_fleet_shows_agent_labels_and_vram_bar_with_its_run(stack: Stack) -> None:
    run_id = stack.scripted_run(sleep_ms=60000, constraints=Constraints(vram_mb=20480, gpu_count=1))
    stack.wait_state(run_id, "RUNNING")
    try:
        page = stack.http.get("/fleet")
        assert page.status_code == 200
        html = page.text
        assert "node-a" in html
        assert "pool=test" in html
        assert "CONNECTED" in html
        # The GPU it holds: 20 GB reserved of 80 GB, the run linked on that GPU's row.
        row = next(r for r in html.split("<tr") if f"/runs/{run_id}" in r)
        assert "20 GB of 80 GB" in row
        assert 'style="width: 25%"' in row
        assert "60 GB free" in row
        assert "healthy" in row
        # The polled fragment says the same without the page around it.
        panel = stack.http.get("/fleet/panel").text
        assert "<html" not in panel
        assert f"/runs/{run_id}" in panel
    finally:
        stack.client.cancel_run(run_id)


def test_runs_list_filters_and_pages(stack: Stack) -> None:
    done = [stack.scripted_run() for _ in range(3)]
    for run_id in done:
        stack.wait_state(run_id, "COMPLETED")
    waiting = stack.client.create_run(
        image="too-big", constraints=Constraints(vram_mb=10**6, gpu_count=1)
    ).id
    try:
        pending = stack.http.get("/runs", params={"state": "PENDING"}).text
        assert waiting in pending
        assert not any(run_id in pending for run_id in done)

        by_image = stack.http.get("/runs/table", params={"image": "scripted"}).text
        assert all(run_id in by_image for run_id in done)
        assert waiting not in by_image

        # Paging as the API has it: a page of one, then the next one by its token.
        first = stack.http.get("/runs", params={"image": "scripted", "page_size": "1"}).text
        assert first.count('<tr data-run="') == 1
        next_link = re.search(r'href="(/runs\?[^"]*page_token=[^"]+)"', first)
        assert next_link is not None
        second = stack.http.get(next_link.group(1).replace("&amp;", "&")).text
        assert second.count('<tr data-run="') == 1
        shown = re.findall(r'<tr data-run="([^"]+)"', first + second)
        assert len(set(shown)) == 2

        assert stack.http.get("/runs", params={"state": "SLEEPING"}).status_code == 400
        bad_time = stack.http.get("/runs", params={"created_after": "yesterday"})
        assert bad_time.status_code == 400
        assert "created_after" in bad_time.text
    finally:
        stack.client.cancel_run(waiting)


def test_run_page_shows_every_attempt_summary_and_json(stack: Stack) -> None:
    run_id = stack.scripted_run(
        inputs={"exit_code": 3, "outputs": {"ignored": True}},
        retry_policy=RetryPolicy(max_attempts=2, initial_delay_s=0.05, max_delay_s=0.05),
    )
    stack.wait_state(run_id, "FAILED")
    wait_for("the second attempt", lambda: stack.client.get_run(run_id).current_attempt == 2)
    stack.wait_state(run_id, "FAILED")
    html = stack.http.get(f"/runs/{run_id}").text
    assert "Attempt 2" in html and "Attempt 1" in html
    assert html.count(">RETRIED<") >= 1
    assert "EXIT_CODE" in html  # the failure class
    assert re.search(r"<dt>Exit code</dt><dd>3</dd>", html)
    assert "&#34;exit_code&#34;: 3" in html  # the inputs, as formatted JSON
    # Retry is offered for a failed run; cancel is not.
    assert re.search(r'data-role="cancel" hidden', html)
    assert not re.search(r'data-role="retry" hidden', html)
    assert stack.http.get("/runs/run_nope").status_code == 404


def test_live_feed_follows_progress_and_log_to_the_end(stack: Stack) -> None:
    run_id = stack.scripted_run(sleep_ms=1500, steps=5, inputs={"outputs": {"score": 0.5}})
    progress: list[int] = []
    lines: list[str] = []
    completed = False
    # The run's changes and its log come from two followers: the last log line may
    # arrive after the run shows COMPLETED, and the feed goes on delivering it.
    with stack.http.stream("GET", f"/runs/{run_id}/live", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event, data in sse_events(response):
            if event == "log":
                lines.extend(line["text"] for line in data)
            if event == "run" and not completed:
                head = data["run-head"]
                found = re.search(r'data-role="run-progress">(\d+) %', head)
                assert found is not None
                progress.append(int(found.group(1)))
                if 'data-role="run-state">COMPLETED' in head:
                    assert "&#34;score&#34;: 0.5" in data["run-body"]
                    completed = True
            if completed and len(lines) >= 5:
                break
    assert progress == sorted(progress)
    assert len(set(progress)) >= 3, progress
    assert progress[-1] == 100
    assert lines == [f"step {i}/5" for i in range(1, 6)]


def test_actions_answer_with_the_apis_error(stack: Stack) -> None:
    run_id = stack.scripted_run()
    stack.wait_state(run_id, "COMPLETED")

    refused = stack.act(f"/api/runs/{run_id}/cancel")
    assert refused.status_code == 409
    assert refused.json()["code"] == "FAILED_PRECONDITION"
    assert refused.json()["reason"] == "RUN_LOCKED"

    # Without the dashboard's header an action is refused before the server is asked.
    forged = stack.http.post(f"/api/runs/{run_id}/retry")
    assert forged.status_code == 403
    assert stack.client.get_run(run_id).current_attempt == 1

    bad = stack.act(f"/api/runs/{run_id}/priority", priority="high")
    assert bad.status_code == 400
    assert bad.json()["violations"] == {"priority": "must be a whole number"}
    locked = stack.act(f"/api/runs/{run_id}/priority", priority="4")
    assert locked.status_code == 409

    assert stack.act("/api/runs/run_nope/retry").status_code == 404


def test_cancel_retry_and_priority_change_the_run(stack: Stack) -> None:
    waiting = stack.client.create_run(
        image="too-big", constraints=Constraints(vram_mb=10**6, gpu_count=1)
    ).id
    answer = stack.act(f"/api/runs/{waiting}/priority", priority="7")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"ok": True, "message": "priority is 7"}
    assert stack.client.get_run(waiting).priority == 7

    assert stack.act(f"/api/runs/{waiting}/cancel").json()["message"] == "cancelled"
    assert stack.client.get_run(waiting).state is OpRunState.CANCELLED

    retried = stack.act(f"/api/runs/{waiting}/retry").json()
    assert retried["ok"] is True and retried["url"] == f"/runs/{waiting}"
    assert stack.client.get_run(waiting).current_attempt == 2
    stack.client.cancel_run(waiting)

    running = stack.scripted_run(sleep_ms=60000)
    stack.wait_state(running, "RUNNING")
    answer = stack.act(f"/api/runs/{running}/cancel")
    assert answer.json()["ok"] is True
    stack.wait_state(running, "CANCELLED")


def test_definitions_and_the_run_form(stack: Stack) -> None:
    stack.client.create_definition(
        OpDefinition(
            name="ui-form-op",
            image="scripted",
            description="For the form test.",
            inputs=[
                InputSpec("progress_steps", InputType.INT, required=True),
                InputSpec("sleep_ms", InputType.INT, default=0),
                InputSpec("outputs", InputType.OBJECT),
            ],
        )
    )
    listed = stack.http.get("/definitions").text
    assert "ui-form-op" in listed and "For the form test." in listed

    page = stack.http.get("/definitions/ui-form-op").text
    for name in ("progress_steps", "sleep_ms", "outputs"):
        assert f'name="{name}"' in page
    assert "default: 0" in page

    refused = stack.act(
        "/api/runs", definition="ui-form-op", version="1", sleep_ms="later", outputs="[1"
    )
    assert refused.status_code == 400
    body = refused.json()
    assert body["reason"] == "INVALID_INPUT"
    assert set(body["violations"]) == {
        "inputs.progress_steps",
        "inputs.sleep_ms",
        "inputs.outputs",
    }
    assert "required" in body["violations"]["inputs.progress_steps"]

    created = stack.act(
        "/api/runs",
        definition="ui-form-op",
        version="1",
        progress_steps="2",
        outputs='{"made": "by the form"}',
        priority="3",
    ).json()
    assert created["ok"] is True
    run_id = created["url"].removeprefix("/runs/")
    stack.wait_state(run_id, "COMPLETED")
    run = stack.client.get_run(run_id)
    assert (run.op_definition, run.priority, run.outputs) == (
        "ui-form-op",
        3,
        {"made": "by the form"},
    )
    assert stack.http.get("/definitions/no-such-op").status_code == 404


def test_drain_from_the_fleet_page(stack: Stack) -> None:
    stack.add_agent("node-drain", gpus="1x24G", labels="pool=drain")
    answer = stack.act("/api/agents/node-drain/drain")
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"] == "node-drain is draining"
    panel = stack.http.get("/fleet/panel").text
    card = panel[panel.index('data-agent="node-drain"') :]
    assert "DRAINING" in card[: card.index("</article>")]
    assert stack.act("/api/agents/nobody/drain").status_code == 404


def test_pages_say_when_the_server_is_away_and_recover(stack: Stack) -> None:
    run_id = stack.scripted_run(sleep_ms=8000, steps=40)
    stack.wait_state(run_id, "RUNNING")
    states: list[tuple[str, object]] = []
    with stack.http.stream("GET", f"/runs/{run_id}/live", timeout=60) as response:
        events = sse_events(response)
        for event, _ in events:
            if event == "run":
                break
        stack.server.stop()
        assert stack.http.get("/fleet/panel").status_code == 503
        unreachable = stack.http.get("/runs")
        assert unreachable.status_code == 503
        assert "data-retry-ms" in unreachable.text
        for event, data in events:
            states.append((event, data))
            if event == "status" and not data["live"]:  # type: ignore[index]
                break
        stack.start_server()
        back = False
        for event, data in events:
            states.append((event, data))
            back = back or (event == "status" and data["live"])  # type: ignore[index]
            if back and event == "run":
                break
    assert states[-1][0] == "run"
    # The polled parts recover on their own too (the UI's channel retries within 2 s).
    wait_for(
        "the fleet panel to answer again",
        lambda: stack.http.get("/fleet/panel").status_code == 200,
        timeout=15,
    )
    stack.wait_state(run_id, "COMPLETED", timeout=60)


def test_the_dashboard_is_served_with_its_assets(stack: Stack) -> None:
    for asset, kind in (
        ("/static/gyoza.css", "text/css"),
        ("/static/gyoza.js", "javascript"),
        ("/static/gyoza.svg", "svg"),
    ):
        response = stack.http.get(asset)
        assert response.status_code == 200 and kind in response.headers["content-type"]
    home = stack.http.get("/", follow_redirects=False)
    assert home.status_code == 307 and home.headers["location"] == "/fleet"
    # No page asks for anything from outside the dashboard.
    for path in ("/fleet", "/runs", "/definitions"):
        html = stack.http.get(path).text
        assert not re.search(r'(src|href)="(https?:)?//', html), path


def test_gyoza_dev_prints_the_dashboards_url(tmp_path: object) -> None:
    import subprocess

    from ui_stack import GYOZA, free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            GYOZA,
            "dev",
            "--executor",
            "scripted",
            "--listen",
            f"127.0.0.1:{port}",
            "--database",
            f"sqlite:///{tmp_path}/dev.db",
            "--state-dir",
            f"{tmp_path}/agent",
            "--ui-listen",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            found = re.search(r"gyoza dev: dashboard on (http://\S+)", line)
            url = found.group(1) if found else None
        assert url is not None
        wait_for(
            "the dev agent on the fleet page", lambda: "-dev" in httpx.get(f"{url}/fleet").text
        )
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()


def test_gyoza_ui_refuses_a_bad_address_or_a_taken_port(stack: Stack) -> None:
    import subprocess

    from ui_stack import GYOZA

    bad = subprocess.run(
        [GYOZA, "ui", "--server", stack.address, "--listen", "localhost"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "--listen must be HOST:PORT" in bad.stderr
    taken = stack.url.removeprefix("http://")
    busy = subprocess.run(
        [GYOZA, "ui", "--server", stack.address, "--listen", taken],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert busy.returncode == 1
    assert f"cannot listen on {taken}" in busy.stderr
