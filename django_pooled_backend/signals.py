"""Django signals sent by the pools, for logging, tracing and metrics.

Every signal is sent with ``sender`` set to the
:class:`~django_pooled_backend.pool.DjangoConnectionPool` concerned and
these keyword arguments, besides the ones listed with each signal:

``alias``
    The database alias of the pool.
``connection``
    The psycopg connection (a ``psycopg.Connection``); only look at it
    (``connection.info.backend_pid``...): it belongs to the pool.

Receivers run synchronously in the thread that does the work, so they
must be quick and must not raise (an exception propagates into the pool's
operation).  ``connection_opened`` runs in a pool worker thread: it must
not use ``django.db.connection``.

When no receiver is connected, sending costs one attribute test: the pool
checks ``signal.receivers`` before building the arguments.
"""

from __future__ import annotations

from django.dispatch import Signal

connection_opened = Signal()
"""A new server connection was opened and configured (in a pool worker thread).

Extra argument: ``seconds``, the time it took to connect and configure.
"""

connection_borrowed = Signal()
"""A connection was lent to the calling thread (``connect()`` of a request).

Extra argument: ``waited``, the seconds the borrow took (waiting for a free
connection, finishing the previous borrower's reset, checking it).
"""

connection_returned = Signal()
"""A borrower gave its connection back (``close()`` at the end of a request).

Extra argument: ``held``, the seconds since it was borrowed.  Sent before the
session reset is started.
"""

connection_reset = Signal()
"""The session reset of a returned connection completed successfully.

The reset is sent when the connection comes back and its answer read just
before the connection is lent again, so this is sent in the thread of the
next borrower (or of ``pool.check()``), right before ``connection_borrowed``.
"""

connection_discarded = Signal()
"""The pool closed a connection instead of lending it again.

Extra argument: ``reason``, one of ``"reset failed"``, ``"check failed"``
(the server closed it, or the borrow-time check failed), ``"max_lifetime"``,
``"max_idle"`` (the pool shrank), ``"drained"`` (opened before the pool was
drained), ``"pool closed"``; a short detail may
follow after a colon.  A connection that was broken when it came back is
discarded by psycopg_pool without a signal of its own.  Receivers must not
call the pool's methods: psycopg_pool may close a connection while it holds
the pool's lock.
"""

borrow_timed_out = Signal()
"""A borrow failed: no connection became free within ``timeout``, or none could be opened.

``connection`` is None.  Extra arguments: ``reason`` (``"timeout"``,
``"max_waiting"`` when too many requests were already waiting and the
borrow was refused at once, or ``"connection_failed"`` when the pool has
no working connection and its attempts to open one failed), ``state``
(the pool's size, idle, lent and waiting counts, as
:meth:`~django_pooled_backend.pool.DjangoConnectionPool.state` gives
them) and ``message`` (the text of the error raised to the borrower).
"""
