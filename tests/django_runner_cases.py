"""Run by ``manage.py test`` in a subprocess (see test_test_runner.py), not by pytest.

The query below runs at import time, while the test runner discovers tests:
before the test database exists.  It opens a pool on the real database.
"""

from __future__ import annotations

import os

from django.db import connection
from django.test import TestCase, TransactionTestCase

from testproject.shop.models import Item

MARKER = os.environ["DPB_RUNNER_MARKER"]

with connection.cursor() as cursor:
    cursor.execute("SELECT current_database()")
    IMPORT_TIME_DATABASE = cursor.fetchone()[0]


class WritesGoToTheTestDatabase(TestCase):
    def test_import_time_query_reached_the_real_database(self) -> None:
        self.assertFalse(IMPORT_TIME_DATABASE.startswith("test_"))

    def test_queries_run_on_the_test_database(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            (name,) = cursor.fetchone()
        self.assertTrue(name.startswith("test_"), name)
        Item.objects.create(name=MARKER)
        self.assertEqual(Item.objects.filter(name=MARKER).count(), 1)


class ReleaseTests(TestCase):
    def test_nothing_goes_back_inside_the_test_transaction(self) -> None:
        # TestCase wraps each test in atomic(): the connection stays, in
        # both release modes, so the test's writes stay visible to it.
        Item.objects.create(name=MARKER)
        self.assertIsNotNone(connection.connection)
        self.assertEqual(Item.objects.filter(name=MARKER).count(), 1)
        self.assertIsNotNone(connection.connection)


class TransactionTests(TransactionTestCase):
    def test_statements_outside_transactions_give_the_connection_back(self) -> None:
        Item.objects.create(name=MARKER)
        if connection.releases_per_transaction:
            self.assertIsNone(connection.connection)
        else:
            self.assertIsNotNone(connection.connection)
        self.assertEqual(Item.objects.filter(name=MARKER).count(), 1)

    def test_transaction_test_case_writes_to_the_test_database(self) -> None:
        Item.objects.create(name=MARKER)
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            (name,) = cursor.fetchone()
        self.assertTrue(name.startswith("test_"), name)


class SerializedRollbackTests(TransactionTestCase):
    serialized_rollback = True

    def test_serialized_rollback(self) -> None:
        Item.objects.create(name=MARKER)
        self.assertTrue(Item.objects.filter(name=MARKER).exists())
