"""Prometheus metrics of an agent, served with ``gyoza agent --metrics-port``.

=====================================  =======  =========================================
metric                                 type     what
=====================================  =======  =========================================
``gyoza_agent_outbox_reports``         gauge    reports stored, not yet acknowledged
``gyoza_agent_held_attempts``          gauge    attempts the agent holds (running, or
                                                with reports left to deliver)
``gyoza_agent_connected``              gauge    1 while a session is welcomed
``gyoza_agent_reconnects_total``       counter  streams that ended and were opened again
``gyoza_agent_executor_outcomes_total`` counter attempts ended, by ``outcome`` (COMPLETED,
                                                FAILED, CANCELLED) and ``failure_class``
=====================================  =======  =========================================

Their names are part of the operator's interface: keep them stable.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

OUTBOX_REPORTS = Gauge(
    "gyoza_agent_outbox_reports", "Reports stored in the outbox and not yet acknowledged."
)
HELD_ATTEMPTS = Gauge(
    "gyoza_agent_held_attempts",
    "Attempts the agent holds: running, or with reports left to deliver.",
)
CONNECTED = Gauge("gyoza_agent_connected", "1 while the agent has a welcomed session.")
RECONNECTS = Counter(
    "gyoza_agent_reconnects", "Streams to the server that ended and were opened again."
)
EXECUTOR_OUTCOMES = Counter(
    "gyoza_agent_executor_outcomes",
    "Attempts ended, by outcome and failure class (empty when it completed).",
    ["outcome", "failure_class"],
)
