"""The leadership lease of replicas sharing one PostgreSQL database.

One replica at a time runs the core. It holds the ``control`` row of the
``leadership`` table: its id, the address other replicas forward calls to, a *term*
that every takeover increments, and an expiry in the database's own clock (so replicas'
clocks never matter). The holder renews the expiry every third of the lease.

A challenger takes the row over when it has expired, or at once when the holder's lease
connection is gone from ``pg_stat_activity`` (a replica killed outright loses its
connections with its process, so failover need not wait for the expiry).

Fencing: every write transaction of the holder first runs :meth:`Leadership.check`
on the writer's own connection, which reads the row ``FOR SHARE`` with the holder's id
and term. A replica that lost the row (it was paused, partitioned, or presumed dead) can
therefore commit nothing more: the check fails with :class:`FencedOut` inside the very
transaction it would have committed, and a takeover waits for the writes that passed the
check to commit first. A local clock or flag is never trusted for this.

The methods are blocking (each is one short statement); the server calls them from a
worker thread.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import NullPool

from gyoza.server.store.engines import normalize_url

ROLE = "control"
"""The one role there is: running the core."""


APPLICATION_NAME = "gyoza-leadership"
"""The lease connection's ``application_name`` in ``pg_stat_activity``."""


class FencedOut(Exception):
    """This replica no longer holds the leadership term it writes under."""

    reason = "NOT_LEADER"


@dataclass(frozen=True)
class Leader:
    """Who holds the lease, as read from the database.

    Attributes
    ----------
    holder : str
        The replica id of the holder ("" before anyone ever held it).
    address : str
        Where it serves (``host:port``), for forwarding.
    term : int
        Incremented by every takeover.
    expires_in_s : float
        Seconds until the lease expires, in the database's clock (negative: expired).
    acquired_at : datetime
        When the holder took it.
    """

    holder: str
    address: str
    term: int
    expires_in_s: float
    acquired_at: datetime

    @property
    def live(self) -> bool:
        """Whether someone holds an unexpired lease."""
        return bool(self.holder) and self.expires_in_s > 0


_ENSURE_ROW = text(
    "INSERT INTO leadership (name, holder, address, term, expires_at, acquired_at) "
    "VALUES (:role, '', '', 0, to_timestamp(0), now()) ON CONFLICT (name) DO NOTHING"
)

_SESSION_GONE = (
    "NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a "
    "WHERE a.pid = leadership.session_pid AND a.backend_start = leadership.session_start)"
)

_ACQUIRE = text(
    "UPDATE leadership SET holder = :me, address = :address, term = term + 1, "
    "expires_at = now() + make_interval(secs => :lease), acquired_at = now(), "
    "session_pid = pg_backend_pid(), "
    "session_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()) "
    "WHERE name = :role AND (expires_at < now() OR holder = '' OR session_pid IS NULL OR "
    + _SESSION_GONE
    + ") RETURNING term"
)

_RENEW = text(
    "UPDATE leadership SET expires_at = now() + make_interval(secs => :lease), "
    "address = :address, "
    "session_pid = pg_backend_pid(), "
    "session_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()) "
    "WHERE name = :role AND holder = :me AND term = :term RETURNING term"
)

_RELEASE = text(
    "UPDATE leadership SET expires_at = to_timestamp(0), session_pid = NULL "
    "WHERE name = :role AND holder = :me AND term = :term"
)

_READ = text(
    "SELECT holder, address, term, EXTRACT(EPOCH FROM (expires_at - now())) AS expires_in, "
    "acquired_at FROM leadership WHERE name = :role"
)

# The check also bounds how long its transaction may sit idle, waiting for this process:
# a replica paused mid-transaction (SIGSTOP, a VM freeze) would otherwise hold the row
# share-locked and block every takeover until it woke up; PostgreSQL ends that session
# instead, rolling back what it had not committed.
_CHECK = text(
    "SELECT term, set_config('idle_in_transaction_session_timeout', :idle_ms, true) "
    "FROM leadership WHERE name = :role AND holder = :me AND term = :term FOR SHARE"
)


class Leadership:
    """One replica's side of the lease, over a connection of its own.

    Parameters
    ----------
    url : str
        The PostgreSQL database (already migrated).
    replica_id : str
        This replica's id, unique among the replicas.
    lease_s : float
        How long a grant or renewal lasts.
    """

    def __init__(self, url: str, replica_id: str, lease_s: float) -> None:
        parsed = normalize_url(url)
        if parsed.get_backend_name() != "postgresql":
            raise ValueError("leadership needs PostgreSQL; SQLite runs one server only")
        self.replica_id = replica_id
        self.lease_s = lease_s
        # A transaction left idle by a paused process ends well within the lease (see
        # _CHECK); the lease connection's own statements are single ones.
        self._idle_ms = str(max(100, int(lease_s * 1000 / 2)))
        self._engine: Engine = create_engine(
            parsed,
            poolclass=NullPool,
            connect_args={
                "application_name": APPLICATION_NAME,
                "options": f"-c idle_in_transaction_session_timeout={self._idle_ms}",
            },
        )
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._term = 0  # the term held, 0: none

    @property
    def term(self) -> int:
        """The term this replica holds (0: it is not the leader)."""
        return self._term

    def acquire(self, address: str) -> Leader:
        """Take the lease if it is free, expired, or its holder's session is gone.

        Returns the holder afterwards: this replica when it got it (:attr:`term` is set).
        """
        params = {"role": ROLE, "me": self.replica_id, "address": address, "lease": self.lease_s}
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(_ENSURE_ROW, {"role": ROLE})
                term = conn.execute(_ACQUIRE, params).scalar()
                conn.commit()
            except BaseException:
                self._reset()
                raise
            if term is not None:
                self._term = int(term)
            return self._read(conn)

    def renew(self, address: str) -> bool:
        """Extend the lease (advertising *address*); False when it was lost."""
        if not self._term:
            return False
        params = {
            "role": ROLE,
            "me": self.replica_id,
            "term": self._term,
            "lease": self.lease_s,
            "address": address,
        }
        with self._lock:
            conn = self._connection()
            try:
                renewed = conn.execute(_RENEW, params).scalar() is not None
                conn.commit()
            except BaseException:
                self._reset()
                raise
        if not renewed:
            self._term = 0
        return renewed

    def release(self) -> None:
        """Give the lease up (on a clean stop), so that another replica takes it at once."""
        term, self._term = self._term, 0
        if not term:
            return
        with self._lock:
            try:
                conn = self._connection()
                conn.execute(_RELEASE, {"role": ROLE, "me": self.replica_id, "term": term})
                conn.commit()
            except Exception:
                self._reset()

    def lost(self) -> None:
        """Forget the term held (the writer was fenced out)."""
        self._term = 0

    def current(self) -> Leader | None:
        """The holder as the database has it now (None before anyone ever held it)."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(_ENSURE_ROW, {"role": ROLE})
                leader = self._read(conn)
                conn.commit()
            except BaseException:
                self._reset()
                raise
            return leader

    def check(self, conn: Connection) -> None:
        """Inside a write transaction on *conn*: raise :class:`FencedOut` unless this
        replica still holds its term; the row stays share-locked until that transaction
        ends, so no takeover can commit in between."""
        term = self._term
        held = (
            term
            and conn.execute(
                _CHECK,
                {"role": ROLE, "me": self.replica_id, "term": term, "idle_ms": self._idle_ms},
            ).first()
            is not None
        )
        if not held:
            self._term = 0
            raise FencedOut(f"replica {self.replica_id} no longer leads (term {term})")

    def close(self) -> None:
        """Close the lease connection (without releasing: see :meth:`release`)."""
        with self._lock:
            self._reset()
        self._engine.dispose()

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self._engine.connect()
        return self._conn

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                conn.close()

    @staticmethod
    def _read(conn: Connection) -> Leader:
        row = conn.execute(_READ, {"role": ROLE}).one()
        return Leader(
            holder=row.holder,
            address=row.address,
            term=int(row.term),
            expires_in_s=float(row.expires_in),
            acquired_at=row.acquired_at,
        )
