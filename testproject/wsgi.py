import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
application = get_wsgi_application()

if os.environ.get("TESTPROJECT_QUERY_AT_IMPORT"):
    # What many projects do by accident: a query while the app is imported.
    # Under gunicorn --preload this runs in the master, before the workers
    # are forked, and leaves a borrowed connection in the master's thread.
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (_pid,) = cursor.fetchone()
    if path := os.environ.get("TESTPROJECT_PID_FILE"):
        with open(path, "w") as f:
            f.write(f"{os.getpid()} {_pid}\n")
