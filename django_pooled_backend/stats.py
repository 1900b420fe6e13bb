"""Pool statistics: counters, snapshots, and their publication for other processes.

A pool lives inside the process that uses it, so ``manage.py poolstats``
run from another shell cannot ask its own (empty) pools.  Instead, every
process that has a pool publishes a snapshot of its pools once a second, as
one small JSON file per process in a directory other processes of the same
project on the same host can read:

* the directory is ``settings.POOLED_BACKEND_STATS_DIR`` or, by default,
  ``<tempdir>/django_pooled_backend-<uid>/<settings module>-<hash>``, where
  the hash is that of the settings file's path, so two projects (or two
  checkouts of one) never mix;
* a daemon thread, started with the process' first pool (and again in a
  forked child, which inherits no threads), writes ``<host>.<pid>.json``
  atomically (write a temporary file, then rename);
* a reader drops the files of processes that no longer exist and marks the
  others stale when they were not refreshed for a few intervals.

On the request path a pool only bumps integers and appends one float to a
bounded deque (:class:`PoolCounters`); everything else (percentiles, the
oldest holder, the file) happens in the publishing thread.  The counters
are plain ``+=`` under the GIL: exact in practice on CPython, and at worst
a sample short, which statistics can afford.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import re
import socket
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict, cast

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from . import failover

if TYPE_CHECKING:
    from .pool import DjangoConnectionPool

logger = logging.getLogger("django_pooled_backend")

SCHEMA = 1
"""Version of the published file format (and of ``poolstats --json``)."""

WAIT_WINDOW = 1000
"""How many recent borrows the wait-time figures are computed over."""

DEFAULT_INTERVAL = 1.0
HOSTNAME = socket.gethostname()

# A snapshot older than this many intervals (and this many seconds) is stale;
# one older than the second pair of numbers is removed whoever wrote it.
STALE_INTERVALS, STALE_MIN_SECONDS = 3, 3.0
REMOVE_INTERVALS, REMOVE_MIN_SECONDS = 60, 60.0

_UNSET = object()
# <host>.<pid>.json, and the temporary files .<host>.<pid>.<random>.tmp.
_FILE_RE = re.compile(
    r"^(?:(?P<host>[^/]+)\.(?P<pid>\d+)\.json"
    r"|(?P<tmp>\.)(?P<thost>[^/]+)\.(?P<tpid>\d+)\.[A-Za-z0-9_]+\.tmp)$"
)


class PoolCounters:
    """What a pool counts beyond psycopg_pool's own statistics.

    The request path touches ``resets`` (one increment per return) and
    ``waits`` (one append per borrow); the other counters move on rare
    paths (errors, closing connections), and ``leaks`` and ``reclaims`` are
    bumped by the leak detector.
    """

    __slots__ = (
        "closed",
        "failed",
        "leaks",
        "opened",
        "reclaims",
        "rejected",
        "resets",
        "resets_failed",
        "served",
        "timeouts",
        "waits",
    )

    def __init__(self, window: int = WAIT_WINDOW) -> None:
        self.resets = 0
        self.resets_failed = 0
        self.timeouts = 0
        self.rejected = 0
        self.opened = 0
        self.closed = 0
        self.leaks = 0
        self.reclaims = 0
        # Borrows that got a connection, and that raised.
        self.served = 0
        self.failed = 0
        # Seconds each recent borrow took to get its connection (queueing
        # and the borrow-time check): deque.append is atomic and O(1).
        self.waits: deque[float] = deque(maxlen=window)


# -- snapshots ---------------------------------------------------------------


class WaitSummary(TypedDict):
    window: int
    mean_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


class HolderSnapshot(TypedDict):
    thread: str
    held_s: float
    where: str


class ServerSnapshot(TypedDict):
    """How many of a pool's connections are on one server (see failover.pool_servers())."""

    host: str
    port: int | None
    role: str
    connections: int


class PoolSnapshot(TypedDict):
    alias: str
    name: str
    target: str
    min_size: int
    max_size: int
    size: int
    idle: int
    lent: int
    pinned: int
    waiting: int
    oldest_waiter_s: float | None
    requests: int
    requests_served: int
    requests_waited: int
    wait: WaitSummary
    timeouts: int
    rejected: int
    connection_errors: int
    connections_opened: int
    connections_closed: int
    connections_lost: int
    resets: int
    resets_failed: int
    leaks: int
    reclaims: int
    oldest_holder: HolderSnapshot | None
    servers: list[ServerSnapshot]


class PoolMetric(NamedTuple):
    """A figure of :class:`PoolSnapshot`: its key, and its metric name everywhere it is exported.

    ``name`` is the Prometheus name without the package prefix (and, for
    counters, without ``_total``); ``kind`` is ``gauge`` or ``counter``.
    """

    name: str
    key: str
    kind: str
    help: str


METRICS = (  # in the order the outputs show them
    PoolMetric("pool_min_size", "min_size", "gauge", "Connections the pool keeps open (min_size)."),
    PoolMetric("pool_max_size", "max_size", "gauge", "Most connections the pool may open."),
    PoolMetric("pool_size", "size", "gauge", "Connections open or being opened."),
    PoolMetric("connections_idle", "idle", "gauge", "Connections waiting in the pool."),
    PoolMetric("connections_lent", "lent", "gauge", "Connections lent out to requests now."),
    PoolMetric(
        "connections_pinned",
        "pinned",
        "gauge",
        "Lent connections kept for their borrower's session state (release='transaction').",
    ),
    PoolMetric("requests_waiting", "waiting", "gauge", "Requests waiting for a connection now."),
    PoolMetric("requests", "requests", "counter", "Connections asked for (borrows)."),
    PoolMetric("requests_served", "requests_served", "counter", "Borrows that got a connection."),
    PoolMetric("requests_waited", "requests_waited", "counter", "Borrows that had to queue."),
    PoolMetric("timeouts", "timeouts", "counter", "Borrows that timed out."),
    PoolMetric("rejected", "rejected", "counter", "Borrows refused by max_waiting."),
    PoolMetric("connection_errors", "connection_errors", "counter", "Failed connection attempts."),
    PoolMetric(
        "connections_opened", "connections_opened", "counter", "Connections opened successfully."
    ),
    PoolMetric(
        "connections_closed", "connections_closed", "counter", "Connections the pool closed."
    ),
    PoolMetric(
        "connections_lost",
        "connections_lost",
        "counter",
        "Connections found broken, when checked or when given back.",
    ),
    PoolMetric("resets", "resets", "counter", "Session resets started on return."),
    PoolMetric("resets_failed", "resets_failed", "counter", "Session resets that failed."),
    PoolMetric("leaks", "leaks", "counter", "Connections reported as leaked."),
    PoolMetric(
        "reclaims",
        "reclaims",
        "counter",
        "Connections taken back from dead threads or left unused (max_idle_lent).",
    ),
)
"""Every figure of a pool snapshot that is exported, with its one name and meaning."""


class ProcessSnapshot(TypedDict):
    schema: int
    pid: int
    host: str
    program: str
    start_time: str | None
    time: float
    interval: float
    pools: list[PoolSnapshot]


def percentile(ordered: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of an ascending, non-empty list."""
    rank = max(math.ceil(p / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def summarize_waits(waits: list[float]) -> WaitSummary:
    """Mean, p95, p99 and max (in milliseconds) of wait durations in seconds."""
    if not waits:
        return {"window": 0, "mean_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(waits)
    return {
        "window": len(ordered),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 3),
        "p95_ms": round(percentile(ordered, 95) * 1000, 3),
        "p99_ms": round(percentile(ordered, 99) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


def _copy(items: Any) -> list[Any]:
    # Other threads add and remove entries while this runs; a copy taken
    # in one C call is consistent, and a retry covers the rare resize.
    for _ in range(5):
        with contextlib.suppress(RuntimeError):
            return list(items)
    return []


def snapshot_pool(pool: DjangoConnectionPool, now: float | None = None) -> PoolSnapshot:
    """The figures of one pool, as published (called off the request path)."""
    now = time.monotonic() if now is None else now
    counters = pool.counters
    state = pool.state()
    ps: dict[str, int] = {}
    for _ in range(5):  # psycopg_pool's Counter grows a key on first use
        with contextlib.suppress(RuntimeError):
            ps = pool.get_stats()
            break

    oldest = pool.handoff.oldest_wait(now)
    oldest_waiter = None if oldest is None else round(oldest, 3)

    holders = _copy(pool.holders.values())
    oldest_holder: HolderSnapshot | None = None
    if holders:
        first = min(holders, key=lambda h: h.since)
        oldest_holder = {
            "thread": first.thread.name,
            "held_s": round(now - first.since, 3),
            "where": first.where_text(),
        }

    # The pool's get_stats() counts every borrow (see DjangoConnectionPool.get_stats()).
    requests = ps.get("requests_num", 0)
    connect_errors = ps.get("connections_errors", 0)
    return {
        "alias": pool.alias,
        "name": pool.name,
        "target": pool.label,
        "min_size": state["min"],
        "max_size": state["max"],
        "size": state["size"],
        "idle": state["idle"],
        "lent": state["lent"],
        "pinned": state["pinned"],
        "waiting": state["waiting"],
        "oldest_waiter_s": oldest_waiter,
        "requests": requests,
        "requests_served": counters.served,
        "requests_waited": ps.get("requests_queued", 0),
        "wait": summarize_waits(_copy(counters.waits)),
        "timeouts": counters.timeouts,
        "rejected": counters.rejected,
        "connection_errors": connect_errors,
        # Not attempts - errors: that counts attempts still in progress.
        "connections_opened": counters.opened,
        "connections_closed": counters.closed,
        "connections_lost": ps.get("connections_lost", 0) + ps.get("returns_bad", 0),
        "resets": counters.resets,
        "resets_failed": counters.resets_failed,
        "leaks": counters.leaks,
        "reclaims": counters.reclaims,
        "oldest_holder": oldest_holder,
        "servers": cast(list[ServerSnapshot], failover.pool_servers(pool)),
    }


def snapshot_process(
    pools: list[DjangoConnectionPool], interval: float = DEFAULT_INTERVAL
) -> ProcessSnapshot:
    """The snapshot this process publishes: its pools, who it is, and when."""
    now = time.monotonic()
    return {
        "schema": SCHEMA,
        "pid": os.getpid(),
        "host": HOSTNAME,
        "program": _program(),
        "start_time": _own_start_time(),
        "time": time.time(),
        "interval": interval,
        "pools": [snapshot_pool(pool, now) for pool in pools if not pool.closed],
    }


# -- where snapshots live ----------------------------------------------------


def configured_directory() -> Path | None:
    """Where this project's snapshots live, or None if publication is off.

    Raises ImproperlyConfigured for a setting that is not a path or None.
    """
    value = getattr(settings, "POOLED_BACKEND_STATS_DIR", _UNSET)
    if value is _UNSET:
        return default_directory()
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value)
    raise ImproperlyConfigured(
        f"settings.POOLED_BACKEND_STATS_DIR is {value!r}: it must be a directory path or "
        "None. Use a path such as '/run/myproject/poolstats', None to publish no pool "
        "statistics, or leave it out for a per-user temporary directory."
    )


def configured_interval() -> float:
    """Seconds between two snapshots of a process (``POOLED_BACKEND_STATS_INTERVAL``)."""
    value = getattr(settings, "POOLED_BACKEND_STATS_INTERVAL", DEFAULT_INTERVAL)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 3600:
        raise ImproperlyConfigured(
            f"settings.POOLED_BACKEND_STATS_INTERVAL is {value!r}: it must be a number of "
            "seconds between 0 and 3600. Use for example 1 (the default)."
        )
    return float(value)


def project_scope() -> str:
    """A directory name that tells this project's processes from other projects'."""
    module = getattr(settings, "SETTINGS_MODULE", None) or "configured"
    loaded = sys.modules.get(module)
    where = getattr(loaded, "__file__", None) or module
    digest = hashlib.sha256(os.path.realpath(where).encode()).hexdigest()[:10]
    return f"{module}-{digest}"


def default_directory() -> Path:
    """``<tempdir>/django_pooled_backend-<uid>/<project scope>``."""
    return Path(tempfile.gettempdir()) / f"django_pooled_backend-{os.getuid()}" / project_scope()


def per_user_base(directory: Path) -> Path | None:
    """The ``django_pooled_backend-<uid>`` directory above ``directory``, if it is in one."""
    base = directory.parent
    return base if base.name == f"django_pooled_backend-{os.getuid()}" else None


def untrusted(directory: Path) -> str | None:
    """Why the per-user ``directory`` cannot be trusted, or None if it can (or is absent).

    In a shared temporary directory somebody else could have created the
    path first, to read or feed our snapshots: the per-user directory and
    the project directory in it must be real directories, owned by this
    user and writable by nobody else.  The writer and the readers apply the
    same test.  An explicit ``POOLED_BACKEND_STATS_DIR`` is the operator's
    choice and is not tested.
    """
    base = per_user_base(directory)
    if base is None:
        return None
    uid = os.getuid()
    for path in (base, directory):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        kind = "a directory"
        if stat.S_ISLNK(info.st_mode):
            kind = "a symbolic link"
        elif not stat.S_ISDIR(info.st_mode):
            kind = "not a directory"
        if kind == "a directory" and info.st_uid == uid and not info.st_mode & 0o022:
            continue
        return (
            f"The pool statistics directory {path} is {kind} owned by "
            f"{_user_name(info.st_uid)}, mode {stat.S_IMODE(info.st_mode):04o}; it must be a "
            f"directory owned by {_user_name(uid)} that only its owner can write. Another "
            "local user may have created it to feed or read this project's statistics: "
            "nothing is published to it or read from it. Remove it "
            f"(rm -r {base}) and restart the server processes, or set "
            "POOLED_BACKEND_STATS_DIR to a directory of your own."
        )
    return None


def _user_name(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def ensure_directory(directory: Path) -> None:
    """Create ``directory`` (mode 0700), refusing a per-user one another user controls."""
    base = per_user_base(directory)
    if base is not None:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = untrusted(directory)
        if problem is not None:
            raise PermissionError(problem)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if base is not None:
        problem = untrusted(directory)
        if problem is not None:
            raise PermissionError(problem)


def process_start_time(pid: int) -> str | None:
    """When ``pid`` started (Linux ``/proc``), to tell a reused pid from the writer."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _program() -> str:
    """What runs: ``gunicorn``, ``celery``, ``manage.py`` (never its arguments)."""
    path = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    name = os.path.basename(path)
    if name == "__main__.py":  # python -m gunicorn
        name = os.path.basename(os.path.dirname(path))
    return name


_start_times: dict[int, str | None] = {}


def _own_start_time() -> str | None:
    pid = os.getpid()
    if pid not in _start_times:
        _start_times[pid] = process_start_time(pid)
    return _start_times[pid]


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces.
    return data.rsplit(")", 1)[-1].split()


def pid_alive(pid: int, start_time: str | None = None) -> bool:
    """Whether process ``pid`` of this host exists and is the one that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # Exists, owned by someone else.
    fields = _proc_stat(pid)
    if fields is None:
        return not os.path.isdir("/proc")
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    return start_time is None or len(fields) <= 19 or fields[19] == start_time


def write_snapshot(directory: Path, snapshot: ProcessSnapshot) -> Path:
    """Publish ``snapshot`` atomically as ``<host>.<pid>.json`` in ``directory``.

    The temporary file gets a random name and is created exclusively, never
    through a symbolic link (``mkstemp``): in a directory another user can
    write, a link or file planted at a predictable name would otherwise make
    us overwrite whatever it points to.  The rename replaces a link planted
    at the final name, not its target.
    """
    name = f"{snapshot['host']}.{snapshot['pid']}"
    path = directory / f"{name}.json"
    data = json.dumps(snapshot, separators=(",", ":")).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return path


def remove_snapshot(directory: Path, pid: int | None = None, host: str = HOSTNAME) -> None:
    """Remove the snapshot of process ``pid`` (this one by default)."""
    name = f"{host}.{os.getpid() if pid is None else pid}"
    paths = [directory / f"{name}.json", *directory.glob(f".{glob.escape(name)}.*.tmp")]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass
class Published:
    """One process' snapshot as read back, with how fresh it is.

    ``suspicious`` says why a snapshot no process of ours would write (one
    stamped in the future, or with an impossible interval) is not shown;
    such a snapshot is always stale.
    """

    snapshot: ProcessSnapshot
    age: float
    stale: bool
    suspicious: str | None = None


def read_snapshots(directory: Path, now: float | None = None) -> list[Published]:
    """Every process' snapshot in ``directory``; removes those of exited processes.

    A snapshot of a process of this host that no longer runs is deleted and
    not returned; one not refreshed for ``STALE_INTERVALS`` intervals is
    returned marked stale; one not refreshed for ``REMOVE_INTERVALS``
    intervals is deleted (its writer is hung or its pid was reused).  One
    stamped in the future, or with an interval no process publishes at, is
    returned stale and suspicious: it would otherwise never go stale.
    """
    now = time.time() if now is None else now
    found: list[Published] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    for entry in entries:
        match = _FILE_RE.match(entry.name)
        if match is None:
            continue
        if match["tmp"]:
            # A writer that died between writing and renaming.
            if match["thost"] == HOSTNAME and not pid_alive(int(match["tpid"])):
                _unlink(entry.path)
            continue
        host, pid = match["host"], int(match["pid"])
        local = host == HOSTNAME
        try:
            snapshot: ProcessSnapshot = json.loads(_read_regular_file(entry.path))
            stamp = float(snapshot["time"])
            interval = float(snapshot["interval"])
            start_time = snapshot.get("start_time")
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            logger.debug("Ignoring unreadable pool statistics file %s.", entry.path)
            continue
        if snapshot.get("schema") != SCHEMA:
            continue
        if local and not pid_alive(pid, start_time):
            _unlink(entry.path)
            continue
        age = now - stamp
        suspicious = _suspicious(age, interval)
        if suspicious is not None:
            found.append(Published(snapshot, age, True, suspicious))
            continue
        if age > max(REMOVE_INTERVALS * interval, REMOVE_MIN_SECONDS):
            _unlink(entry.path)
            continue
        stale = age > max(STALE_INTERVALS * interval, STALE_MIN_SECONDS)
        found.append(Published(snapshot, max(age, 0.0), stale))
    found.sort(key=lambda p: (p.snapshot["host"], p.snapshot["pid"]))
    return found


FUTURE_TOLERANCE = 1.0
"""Seconds a snapshot may be stamped ahead of the reader's clock (clock steps, rounding)."""


def _suspicious(age: float, interval: float) -> str | None:
    if not math.isfinite(age) or age < -FUTURE_TOLERANCE:
        return f"it is stamped {-age:.1f}s in the future"
    if not (math.isfinite(interval) and 0 < interval < 3600):
        return f"its interval {interval!r} is not one a process publishes at"
    return None


def _read_regular_file(path: str) -> bytes:
    """The content of ``path``, refusing a symbolic link or anything but a plain file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read()


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# -- the publishing thread ---------------------------------------------------


class Publisher:
    """A daemon thread writing this process' snapshot every ``interval`` seconds."""

    def __init__(self, directory: Path, interval: float) -> None:
        self.directory = directory
        self.interval = interval
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._failed = False
        # One writer at a time: the thread and an explicit publish() would
        # race to rename their temporary files.
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name="django_pooled_backend stats", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def publish(self) -> None:
        """Write (or, with no open pool left, remove) this process' snapshot."""
        pools = [pool for pool in _pool_source() if not pool.closed]
        with self._lock:
            if not pools:
                remove_snapshot(self.directory)
                return
            ensure_directory(self.directory)
            write_snapshot(self.directory, snapshot_process(pools, self.interval))

    def _run(self) -> None:
        while True:
            try:
                self.publish()
                self._failed = False
            except Exception as exc:  # noqa: BLE001 - never let statistics kill a process
                if not self._failed:
                    logger.warning(
                        "Could not publish pool statistics in %s: %s", self.directory, exc
                    )
                self._failed = True
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        """Stop the thread and remove the snapshot: this process is going away."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.interval + 1)
        with contextlib.suppress(OSError):
            remove_snapshot(self.directory, self.pid)


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def _no_pools() -> list[DjangoConnectionPool]:
    return []


# Where the publisher finds this process' pools: the registry says, when it
# is imported (see use_pools()); stats.py imports nothing of the pool side.
_pool_source: Callable[[], list[DjangoConnectionPool]] = _no_pools


def use_pools(source: Callable[[], list[DjangoConnectionPool]]) -> None:
    """Publish the pools ``source`` returns (the registry's, see registry.py)."""
    global _pool_source
    _pool_source = source


def start_publishing() -> None:
    """Start this process' publishing thread unless it runs (called with each new pool)."""
    global _publisher
    if _publisher is not None and _publisher.pid == os.getpid():
        return
    with _publisher_lock:
        if _publisher is not None and _publisher.pid == os.getpid():
            return
        try:
            directory = configured_directory()
            interval = configured_interval()
        except ImproperlyConfigured as exc:
            # A system check reports this; the pool itself must work.
            logger.warning("Pool statistics are not published: %s", exc)
            directory = None
        if directory is None:
            return
        publisher = Publisher(directory, interval)
        publisher.start()
        _publisher = publisher


def publisher() -> Publisher | None:
    """This process' publishing thread, if it has started."""
    current = _publisher
    return current if current is not None and current.pid == os.getpid() else None


def stop_publishing() -> None:
    """Stop this process' publishing thread and remove its snapshot."""
    global _publisher
    current = publisher()
    _publisher = None
    if current is not None:
        current.stop()


def _after_fork_in_child() -> None:
    # Threads do not survive fork(): the child publishes under its own pid,
    # from its own thread, once it opens a pool of its own.
    global _publisher, _publisher_lock
    _publisher = None
    _publisher_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(stop_publishing)
