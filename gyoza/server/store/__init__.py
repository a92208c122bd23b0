"""The store: definitions, runs, events, logs and the topic log, in SQLite or PostgreSQL.

``Store`` is the async facade the server uses; ``InMemoryStore`` has the same interface
for fast unit tests. Tables, the Alembic migrations, the synchronous repository and the
group-commit writer live beside them.
"""

from __future__ import annotations

from gyoza.server.store.memory import InMemoryStore
from gyoza.server.store.records import LOG_RETENTION, LogRecord, RunFilter, TopicRecord
from gyoza.server.store.store import Store

__all__ = ["LOG_RETENTION", "InMemoryStore", "LogRecord", "RunFilter", "Store", "TopicRecord"]
