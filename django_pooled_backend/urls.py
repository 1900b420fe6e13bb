"""URLs of the live pool page; include them under the admin, before ``admin.site.urls``::

    urlpatterns = [
        path("admin/pools/", include("django_pooled_backend.urls")),
        path("admin/", admin.site.urls),
    ]

The page is ``django_pooled_backend:pools``, its JSON
``django_pooled_backend:pools_data``.
"""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from . import views

app_name = "django_pooled_backend"

urlpatterns = [
    # admin_view(): staff only (others go to the admin's login page), no
    # caching, CSRF protection, as for the admin's own pages.
    path("", admin.site.admin_view(views.pools), name="pools"),
    path("data.json", views.pools_data, name="pools_data"),
]
