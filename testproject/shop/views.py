"""Views that exercise the pool the way real requests do."""

from __future__ import annotations

import os
import time

from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404

from .models import Item, Order


def read(request: HttpRequest, pk: int) -> JsonResponse:
    """A read: one ORM get by primary key."""
    item = get_object_or_404(Item, pk=pk)
    return JsonResponse({"id": item.pk, "name": item.name, "quantity": item.quantity})


def write(request: HttpRequest, pk: int) -> JsonResponse:
    """A write in atomic(): lock the item, add an order, update the stock."""
    with transaction.atomic():
        item = Item.objects.select_for_update().get(pk=pk)
        order = Order.objects.create(item=item, quantity=1)
        item.quantity += 1
        item.save(update_fields=["quantity"])
    return JsonResponse({"order": order.pk, "quantity": item.quantity})


def slow(request: HttpRequest) -> JsonResponse:
    """Hold a connection while waiting (``?ms=``), as a request calling another service does."""
    ms = int(request.GET.get("ms", "200"))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    time.sleep(ms / 1000)
    return JsonResponse({"backend_pid": pid, "slept_ms": ms})


async def count_async(request: HttpRequest) -> JsonResponse:
    """An async view whose ORM call runs in an executor thread, as ``thread_sensitive=False`` does.

    Those threads outlive the request and never see its end: nothing closes
    their connection objects (``?using=`` names the database alias).
    """
    using = request.GET.get("using", "default")
    count = await sync_to_async(Item.objects.using(using).count, thread_sensitive=False)()
    return JsonResponse({"count": count})


def whoami(request: HttpRequest) -> JsonResponse:
    """Which process and which server connection served this request."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_setting('TimeZone')")
        pid, tz = cursor.fetchone()
    return JsonResponse({"worker_pid": os.getpid(), "backend_pid": pid, "timezone": tz})
