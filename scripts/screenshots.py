#!/usr/bin/env python3
"""Write a PNG of each page of the dashboard under docs/ui/ (``make screenshots``).

It starts a real server on a throwaway SQLite file, three scripted agents that declare
GPUs, and ``gyoza ui``, all on 127.0.0.1; deploys two definitions and creates runs in
every state; then drives Debian's headless Chromium (``/usr/bin/chromium`` with
``/usr/bin/chromedriver``; override with GYOZA_CHROMIUM / GYOZA_CHROMEDRIVER) through
Selenium. Everything stops when it is done.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from gyoza.client import Client
from gyoza.models.op_definition import InputSpec, InputType, OpDefinition
from gyoza.models.resources import Constraints, OpRunState, RetryPolicy

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "ui"
GYOZA = str(Path(sys.executable).with_name("gyoza"))
CHROMIUM = os.environ.get("GYOZA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GYOZA_CHROMEDRIVER", "/usr/bin/chromedriver")
WIDTH = 1360


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: timed out waiting for {what}")
        time.sleep(0.1)


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--window-size={WIDTH},900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def shoot(driver: webdriver.Chrome, url: str, name: str, ready: str) -> None:
    driver.set_window_size(WIDTH, 900)
    driver.get(url)
    wait_for(f"{name} to render", lambda: bool(driver.find_elements(By.CSS_SELECTOR, ready)))
    time.sleep(1.0)  # let a live update or two land, as a person would see it
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, min(int(height) + 20, 3200))
    time.sleep(0.3)
    path = OUT / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshots: wrote {path.relative_to(ROOT)}")


def seed(client: Client) -> dict[str, str]:
    """Definitions and runs in every state; the ids of the runs worth a picture."""
    client.create_definition(
        OpDefinition(
            name="train-lora",
            image="scripted",
            description="Fine-tune a LoRA adapter on a dataset shard.",
            inputs=[
                InputSpec("dataset", InputType.STRING, required=True, description="Shard URI"),
                InputSpec("sleep_ms", InputType.INT, default=90000, description="How long"),
                InputSpec("progress_steps", InputType.INT, default=40),
                InputSpec("learning_rate", InputType.FLOAT, default=0.0002),
                InputSpec("outputs", InputType.OBJECT, description="What it reports"),
            ],
            constraints=Constraints(cpu=4, ram_mb=16384, vram_mb=40960, gpu_count=1),
            retry_policy=RetryPolicy(max_attempts=3),
        )
    )
    client.create_definition(
        OpDefinition(
            name="embed-images",
            image="scripted",
            description="Compute CLIP embeddings for a batch of images.",
            inputs=[
                InputSpec("batch", InputType.ARRAY, required=True),
                InputSpec("sleep_ms", InputType.INT, default=400),
                InputSpec("exit_code", InputType.INT, default=0),
            ],
            constraints=Constraints(cpu=2, ram_mb=4096, vram_mb=12288, gpu_count=1),
            retry_policy=RetryPolicy(max_attempts=1),
        )
    )
    runs: dict[str, str] = {}
    for i in range(6):
        run = client.create_run(
            definition="embed-images",
            inputs={
                "batch": [f"img-{i}-{j}.jpg" for j in range(3)],
                "exit_code": 1 if i == 4 else 0,
            },
        )
        runs.setdefault("done", run.id)
    for shard in range(5):
        run = client.create_run(
            definition="train-lora",
            inputs={
                "dataset": f"s3://corpus/shard-{shard:03d}",
                "sleep_ms": 60000 + 15000 * shard,
                "outputs": {"loss": 0.31, "adapter": f"lora-{shard}.safetensors"},
            },
            priority=5 if shard == 0 else 0,
        )
        runs.setdefault("training", run.id)
    # Too big for any GPU here: it waits.
    client.create_run(
        image="registry.example/llm-70b:1.2",
        inputs={"prompt": "hello"},
        constraints=Constraints(cpu=16, ram_mb=65536, vram_mb=150000, gpu_count=1),
    )
    cancelled = client.create_run(image="scripted", inputs={"sleep_ms": 60000})
    client.cancel_run(cancelled.id)
    return runs


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="gyoza-shots-") as tmp:
        port = free_port()
        address = f"127.0.0.1:{port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = open(Path(tmp) / "procs.log", "ab")  # noqa: SIM115 - closed in finally
        try:
            procs.append(
                subprocess.Popen(
                    [GYOZA, "server", "--listen", address, "--database", f"sqlite:///{tmp}/g.db"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
            client = Client(address, timeout=10)

            def serving() -> bool:
                try:
                    client.list_agents()
                except Exception:
                    return False
                return True

            wait_for("the server", serving)
            fleet = [
                ("dgx-a100-01", "8x80G", "zone=eu-west-1a,pool=training"),
                ("dgx-a100-02", "8x80G", "zone=eu-west-1b,pool=training"),
                ("l4-inference-01", "4x24G", "zone=eu-west-1a,pool=inference"),
            ]
            for name, gpus, labels in fleet:
                procs.append(
                    subprocess.Popen(
                        [
                            GYOZA,
                            "agent",
                            "--server",
                            address,
                            "--name",
                            name,
                            "--executor",
                            "scripted",
                            "--gpus",
                            gpus,
                            "--labels",
                            labels,
                            "--cpu",
                            "64",
                            "--ram-mb",
                            "524288",
                            "--state-dir",
                            f"{tmp}/agent-{name}",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
            wait_for("the agents", lambda: len(client.list_agents()) == len(fleet))
            runs = seed(client)
            wait_for(
                "the short runs to end",
                lambda: client.get_run(runs["done"]).state is OpRunState.COMPLETED,
            )
            time.sleep(3)  # the training runs get some way
            ui = subprocess.Popen(
                [GYOZA, "ui", "--server", address, "--listen", "127.0.0.1:0"],
                stderr=subprocess.PIPE,
                env=env,
            )
            procs.append(ui)
            assert ui.stderr is not None
            line = ui.stderr.readline().decode()
            found = re.search(r"(http://\S+)", line)
            if not found:
                raise SystemExit(f"screenshots: gyoza ui did not start: {line}")
            url = found.group(1)
            driver = browser()
            try:
                shoot(driver, f"{url}/fleet", "fleet", ".agent")
                shoot(driver, f"{url}/runs", "runs", "table.runs")
                shoot(driver, f"{url}/runs/{runs['training']}", "run", "#log .line")
                shoot(driver, f"{url}/definitions", "definitions", "table.definitions")
                driver.get(f"{url}/definitions/train-lora")
                driver.find_element(By.NAME, "sleep_ms").send_keys("soon")
                driver.find_element(By.CSS_SELECTOR, "#run-form [type=submit]").click()
                wait_for(
                    "the violations",
                    lambda: bool(driver.find_elements(By.CSS_SELECTOR, ".field.invalid")),
                )
                driver.execute_script(
                    "document.getElementById('flash').hidden = true; window.scrollTo(0, 0)"
                )
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(WIDTH, min(int(height) + 120, 2400))
                time.sleep(0.3)
                driver.save_screenshot(str(OUT / "definition.png"))
                print("screenshots: wrote docs/ui/definition.png")
            finally:
                driver.quit()
            client.close()
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()


if __name__ == "__main__":
    main()
