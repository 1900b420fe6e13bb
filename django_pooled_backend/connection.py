"""A pooled connection and everything the pool knows about it.

Every piece of per-connection state lives here, as attributes of the
psycopg connection class the pool opens (``connection_class`` of
psycopg_pool): what the pool, the reset, the statement judge and the
housekeeping thread note about one server connection.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from .pool import DjangoConnectionPool
    from .session import StatementJudge


class Goodbye:
    """A notice handler that keeps the error a server sent between queries.

    libpq hands an ErrorResponse that arrives while no query runs to the
    notice handlers: it is the server saying why it closes the connection
    (``terminating connection due to administrator command``).  Held by the
    connection, holding nothing: no reference cycle.
    """

    __slots__ = ("message",)

    def __init__(self) -> None:
        self.message: str | None = None

    def __call__(self, diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized in ("ERROR", "FATAL", "PANIC"):
            self.message = diag.message_primary or diag.severity_nonlocalized


@dataclass(frozen=True)
class Revoked:
    """Why a pool took a connection back from a borrower that could still use it."""

    why: str
    # The borrower had changed the session (SET, temporary tables, advisory
    # locks...): that state is gone, which its next use must be told.
    lost_session_state: bool


class PooledConnection(psycopg.Connection[Any]):
    """A psycopg connection with the pool's bookkeeping attached.

    Each pool opens connections of a subclass of its own (see
    :meth:`for_pool`), so that a failed attempt, which has no connection
    object to carry anything, still reaches the pool that made it.
    """

    # The pool that opens connections of this class (set on the subclass).
    _dpb_opener: weakref.ref[DjangoConnectionPool] | None = None

    # -- set when the connection is opened (see DjangoConnectionPool) --------
    # The pool that lent it, and to which it goes back.
    _dpb_pool: weakref.ref[DjangoConnectionPool] | None = None
    # When it was opened, and when the pool closes it for max_lifetime (monotonic).
    _dpb_created_at: float = 0.0
    _dpb_expire_at: float = float("inf")
    # Opened by the pool itself while psycopg_pool was backing off (see
    # DjangoConnectionPool._open_own()): closed rather than given to it.
    _dpb_own: bool = False
    # Notes the error a server sends outside a query before it closes the connection.
    _dpb_goodbye: Goodbye | None = None
    # Judges the statements run on this connection (None: every one dirties).
    _dpb_judge: StatementJudge | None = None

    # The server it was last seen on (failover.ServerInfo; see
    # failover.server_of_unused()), for poolstats and the metrics.
    _dpb_server: Any = None

    # -- the return path and the borrow-time check (see reset.py) ------------
    # Time (monotonic) the connection was last returned or checked.
    _dpb_last_ok: float = 0.0
    # A reset query was sent and its answer has not been read yet.
    _dpb_reset_pending: bool = False

    # -- noted by the cursor classes (see session.py) ------------------------
    # The session needs a reset before the next borrower: a statement may
    # have changed its state, or a cursor WITH HOLD was declared.
    _dpb_dirty: bool = False
    # A statement may have changed session state that the borrower's later
    # statements rely on: transaction-scoped release pins the connection.
    _dpb_stateful: bool = False
    # A statement ran since the housekeeping thread last looked (see
    # tracking.take_back_idle()).
    _dpb_active: bool = False

    # -- the borrower's side (see base.py) -----------------------------------
    # connection_created was sent for a Django connection holding this one
    # (transaction-scoped release borrows again without connect()).
    _dpb_announced: bool = False
    # Set when the pool took the connection back from a borrower that is
    # still alive (see DjangoConnectionPool.revoke()): the connection is
    # closed, and this says why, for the borrower's next use.
    _dpb_revoked: Revoked | None = None
    # Why the pool closes it, for the connection_discarded signal (None:
    # found out in close()).
    _dpb_discard_reason: str | None = None

    @classmethod
    def for_pool(cls, pool: DjangoConnectionPool) -> type[PooledConnection]:
        """The connection class of ``pool``: connections that report to it."""
        return type(cls.__name__, (cls,), {"_dpb_opener": weakref.ref(pool)})

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> PooledConnection:
        # psycopg_pool opens every connection with connection_class.connect().
        pool = cls._dpb_opener() if cls._dpb_opener is not None else None
        started = time.monotonic()
        try:
            conn = super().connect(conninfo, **kwargs)
        except Exception as exc:
            if pool is not None:
                pool.connect_failed(exc, started)
            raise
        assert isinstance(conn, PooledConnection)
        if pool is not None:
            conn._dpb_pool = cls._dpb_opener
            conn._dpb_created_at = time.monotonic()
            pool.connected(conn, conn._dpb_created_at - started)
        return conn

    def close(self) -> None:
        # Every way a connection is closed ends here: the pool hears of it.
        ref = self._dpb_pool
        pool = ref() if ref is not None else None
        if pool is not None:
            self._dpb_pool = None
            pool.closing(self)
        super().close()
