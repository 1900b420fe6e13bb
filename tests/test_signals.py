"""The pool's signals, each received from a real operation against the server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from django.db import OperationalError
from django.dispatch import Signal

from django_pooled_backend import registry, signals
from django_pooled_backend.pool import DjangoConnectionPool
from testproject.launch import wait_for

from .conftest import Wrappers, only_request_mode, server_pids, wait_gone
from .test_pooling import request_cycle

ALL = {
    "opened": signals.connection_opened,
    "borrowed": signals.connection_borrowed,
    "returned": signals.connection_returned,
    "reset": signals.connection_reset,
    "discarded": signals.connection_discarded,
    "timed_out": signals.borrow_timed_out,
}


@dataclass
class Received:
    """What the receivers saw: (signal name, kwargs) in order, for one alias."""

    alias: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.events]

    def of(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [kwargs for n, kwargs in self.events if n == name]

    def wait_for(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        """The events ``name`` once there are ``count`` of them."""
        return wait_for(lambda: len(self.of(name)) >= count and self.of(name), what=name)


@pytest.fixture
def received() -> Iterator[Received]:
    seen = Received("signals")
    handlers = []
    for name, signal in ALL.items():

        def handler(sender: Any, *, _name: str = name, **kwargs: Any) -> None:
            assert isinstance(sender, DjangoConnectionPool)
            if kwargs["alias"] == seen.alias:
                with seen.lock:
                    seen.events.append((_name, kwargs))

        signal.connect(handler, weak=False)
        handlers.append((signal, handler))
    try:
        yield seen
    finally:
        for signal, handler in handlers:
            signal.disconnect(handler)


def test_opened_borrowed_returned_and_reset_follow_a_request_cycle(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any], received: Received
) -> None:
    wrapper = make_wrapper("signals", {"min_size": 1, "max_size": 1})
    # set_config(): the first borrower leaves a session that needs a reset.
    first = request_cycle(wrapper, "SELECT pg_backend_pid(), set_config('app.x', '1', false)")
    second = request_cycle(wrapper)
    assert first == second
    (opened,) = received.of("opened")
    assert opened["connection"].info.backend_pid == first
    assert opened["seconds"] >= 0
    assert first in server_pids(admin, make_wrapper.application_name("signals"))
    # The reset sent by the first return is read just before the second borrow.
    assert [n for n in received.names() if n != "opened"] == [
        "borrowed",
        "returned",
        "reset",
        "borrowed",
        "returned",
    ]
    for kwargs in received.of("borrowed") + received.of("returned") + received.of("reset"):
        assert kwargs["connection"].info.backend_pid == first
    assert all(kwargs["waited"] >= 0 for kwargs in received.of("borrowed"))
    assert all(kwargs["held"] >= 0 for kwargs in received.of("returned"))


def test_a_connection_the_server_closed_is_discarded_when_lent(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any], received: Received
) -> None:
    # "always": the backend leaves pg_stat_activity a moment before its
    # socket closes, so a check that only looks for EOF could miss it.
    wrapper = make_wrapper("signals", {"min_size": 1, "max_size": 1, "check": "always"})
    pid = request_cycle(wrapper)
    (idle,) = wrapper.pool.idle_connections()  # type: ignore[union-attr]
    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_gone(admin, pid)
    assert request_cycle(wrapper) != pid
    (discarded,) = received.of("discarded")
    # Whichever of reading its reset's answer or checking it saw the EOF first.
    assert discarded["reason"].startswith(("check failed: ", "reset failed: "))
    assert discarded["connection"] is idle


@only_request_mode
def test_a_connection_whose_reset_fails_is_discarded_with_that_reason(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any], received: Received
) -> None:
    wrapper = make_wrapper("signals", {"min_size": 1, "max_size": 1})
    with wrapper.cursor() as cursor:
        # set_config(): a session that needs its reset.
        cursor.execute("SELECT set_config('app.x', '1', false)")
    pid = wrapper.connection.info.backend_pid
    # Killed while lent: the reset sent on return gets no answer but EOF.
    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_gone(admin, pid)
    wrapper.close()
    assert request_cycle(wrapper) != pid
    (discarded,) = received.of("discarded")
    assert discarded["reason"].startswith("reset failed")
    assert "reset" not in received.names()


def test_an_expired_connection_is_discarded_for_max_lifetime(
    make_wrapper: Wrappers, received: Received
) -> None:
    wrapper = make_wrapper("signals", {"min_size": 1, "max_size": 1, "max_lifetime": 0.2})
    wrapper.ensure_connection()
    time.sleep(0.3)  # outlive max_lifetime while lent
    wrapper.close()
    (discarded,) = received.wait_for("discarded")
    assert discarded["reason"] == "max_lifetime"


def test_closing_the_pool_discards_its_idle_connections(
    make_wrapper: Wrappers, received: Received
) -> None:
    wrapper = make_wrapper("signals", {"min_size": 2, "max_size": 2})
    request_cycle(wrapper)
    received.wait_for("opened", 2)
    registry.close_alias("signals")
    reasons = [kwargs["reason"] for kwargs in received.of("discarded")]
    assert reasons == ["pool closed", "pool closed"]


def test_a_borrow_that_times_out_sends_the_pool_state(
    make_wrapper: Wrappers, received: Received
) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 0.2}
    holder = make_wrapper("signals", options)
    holder.ensure_connection()
    wrapper = make_wrapper("signals", options)
    with pytest.raises(OperationalError):
        wrapper.ensure_connection()
    holder.close()
    (timed_out,) = received.of("timed_out")
    assert timed_out["reason"] == "timeout"
    assert timed_out["connection"] is None
    assert timed_out["state"]["lent"] == 1
    assert "database alias 'signals'" in timed_out["message"]


def test_signals_without_receivers_are_not_sent(make_wrapper: Wrappers) -> None:
    # The pool tests `receivers` before building arguments: prove that a
    # signal with no receiver is never sent.
    sent: list[str] = []
    originals = {name: signal.send for name, signal in ALL.items()}

    def spy(name: str, original: Any) -> Any:
        def send(sender: Any, **kwargs: Any) -> Any:
            sent.append(name)
            return original(sender, **kwargs)

        return send

    # Receivers connected elsewhere are set aside.
    saved = {name: signal.receivers for name, signal in ALL.items()}
    for name, signal in ALL.items():
        signal.receivers = []
        signal.sender_receivers_cache.clear()
        signal.send = spy(name, originals[name])  # type: ignore[method-assign]
    try:
        wrapper = make_wrapper("signals", {"min_size": 1, "max_size": 1})
        request_cycle(wrapper)
        request_cycle(wrapper)
    finally:
        for name, signal in ALL.items():
            del signal.send
            signal.receivers = saved[name]
            signal.sender_receivers_cache.clear()
            assert signal.send == originals[name]
    assert sent == []


def test_signals_are_django_signals() -> None:
    assert all(isinstance(signal, Signal) for signal in ALL.values())
