from django.contrib import admin
from django.contrib.staticfiles.views import serve
from django.urls import include, path, re_path

from django_pooled_backend.prometheus import metrics_view
from testproject.shop import views

# The admin index links to the live pool page (django_pooled_backend.urls).
admin.site.index_template = "django_pooled_backend/admin_index.html"

urlpatterns = [
    path("admin/pools/", include("django_pooled_backend.urls")),
    path("admin/", admin.site.urls),
    path("items/<int:pk>/", views.read, name="read"),
    path("items/<int:pk>/order/", views.write, name="write"),
    path("slow/", views.slow, name="slow"),
    path("whoami/", views.whoami, name="whoami"),
    path("async/count/", views.count_async, name="count_async"),
    path("metrics/", metrics_view, name="metrics"),
    # gunicorn serves the testproject with no web server in front: the
    # admin's and the pool page's CSS and JavaScript come from the apps'
    # static directories (never do this in production).
    re_path(r"^static/(?P<path>.*)$", serve, {"insecure": True}),
]
