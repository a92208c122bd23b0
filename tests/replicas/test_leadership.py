"""The leadership lease and its fencing, on a real PostgreSQL database.

Two ``Leadership`` objects stand for two replicas; the writer's fence is checked the way
the store's writer runs it, first in a write transaction on another connection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from gyoza.server.store.leadership import FencedOut, Leadership
from gyoza.server.store.schema import upgrade

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def database(fresh_pg_database: str) -> Iterator[str]:
    engine = sa.create_engine(fresh_pg_database, poolclass=NullPool)
    upgrade(engine)
    engine.dispose()
    yield fresh_pg_database


def _fenced_write(leadership: Leadership, engine: sa.Engine) -> None:
    """A write transaction as the store's writer runs it: the fence first."""
    with engine.begin() as conn:
        leadership.check(conn)
        conn.execute(sa.text("UPDATE leadership SET acquired_at = acquired_at"))


def test_one_holder_at_a_time_and_a_takeover_fences_the_old_one(database: str) -> None:
    a = Leadership(database, "a", lease_s=0.5)
    b = Leadership(database, "b", lease_s=0.5)
    writes = sa.create_engine(database, poolclass=NullPool)
    try:
        assert a.acquire("127.0.0.1:1").holder == "a"
        first = a.term
        assert first > 0
        seen = b.acquire("127.0.0.1:2")
        assert (seen.holder, seen.address, seen.term) == ("a", "127.0.0.1:1", first)
        assert b.term == 0
        _fenced_write(a, writes)  # the holder writes

        # a stops renewing (paused): once its lease expires, b takes over.
        deadline = time.monotonic() + 10
        while not b.term:
            assert time.monotonic() < deadline, "b never took the expired lease"
            time.sleep(0.1)
            b.acquire("127.0.0.1:2")
        assert b.term == first + 1
        # a wakes up: nothing it writes commits, and it cannot renew.
        with pytest.raises(FencedOut):
            _fenced_write(a, writes)
        assert a.term == 0
        assert not a.renew("127.0.0.1:1")
        _fenced_write(b, writes)
        assert b.renew("127.0.0.1:2")
    finally:
        for leadership in (a, b):
            leadership.close()
        writes.dispose()


def test_a_holder_whose_session_is_gone_is_replaced_at_once(database: str) -> None:
    a = Leadership(database, "a", lease_s=60)
    b = Leadership(database, "b", lease_s=60)
    try:
        a.acquire("x:1")
        assert b.acquire("y:2").holder == "a"
        a.close()  # the process died: its lease connection is gone
        deadline = time.monotonic() + 5  # the backend exits just after the socket closes
        while (took := b.acquire("y:2")).holder != "b":
            assert time.monotonic() < deadline, "b waited for the lease of a dead holder"
            time.sleep(0.05)
        assert took.address == "y:2"
        assert b.term > 0
    finally:
        b.close()


def test_a_takeover_waits_for_the_holders_fenced_write_to_commit(database: str) -> None:
    """A write that passed the fence commits before a takeover can: the check holds
    the leadership row until the end of its transaction."""
    a = Leadership(database, "a", lease_s=2.0)
    b = Leadership(database, "b", lease_s=60)
    writes = sa.create_engine(database, poolclass=NullPool)
    release = threading.Event()
    try:
        a.acquire("x:1")
        term = a.term
        time.sleep(2.1)  # a's lease has expired, but a is mid-write
        checked, committed = threading.Event(), threading.Event()

        def slow_write() -> None:
            with writes.begin() as conn:
                a.check(conn)
                checked.set()
                release.wait(10)
            committed.set()

        writer = threading.Thread(target=slow_write)
        writer.start()
        assert checked.wait(10)
        taken = threading.Event()
        threading.Thread(target=lambda: (b.acquire("y:2"), taken.set())).start()
        assert not taken.wait(0.3), "the takeover did not wait for the fenced write"
        release.set()
        writer.join(10)
        assert committed.is_set()
        assert taken.wait(10)
        assert b.term == term + 1
        with pytest.raises(FencedOut):
            _fenced_write(a, writes)
    finally:
        release.set()
        for leadership in (a, b):
            leadership.close()
        writes.dispose()


def test_a_write_left_open_by_a_paused_holder_cannot_block_a_takeover(database: str) -> None:
    """A holder paused in the middle of a write transaction (SIGSTOP) would hold the
    row forever: the database ends that idle transaction, uncommitted, within half a
    lease, and the takeover goes on."""
    a = Leadership(database, "a", lease_s=0.4)
    b = Leadership(database, "b", lease_s=60)
    writes = sa.create_engine(database, poolclass=NullPool)
    try:
        a.acquire("x:1")
        term = a.term
        conn = writes.connect()
        conn.begin()
        a.check(conn)  # ...and a is paused here, its transaction open
        deadline = time.monotonic() + 10
        while b.acquire("y:2").holder != "b":
            assert time.monotonic() < deadline, "the paused write blocked the takeover"
            time.sleep(0.05)
        assert b.term == term + 1
        with pytest.raises(sa.exc.DBAPIError, match="idle-in-transaction timeout"):
            conn.execute(sa.text("SELECT 1"))  # its session was ended
        conn.invalidate()
    finally:
        for leadership in (a, b):
            leadership.close()
        writes.dispose()


def test_a_clean_stop_releases_the_lease(database: str) -> None:
    a = Leadership(database, "a", lease_s=60)
    b = Leadership(database, "b", lease_s=60)
    try:
        a.acquire("x:1")
        a.release()
        assert b.acquire("y:2").holder == "b"
    finally:
        a.close()
        b.close()
