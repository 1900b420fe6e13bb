from django.contrib import admin
from django.urls import path

from django_pooled_backend.prometheus import metrics_view
from testproject.shop import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("items/<int:pk>/", views.read, name="read"),
    path("items/<int:pk>/order/", views.write, name="write"),
    path("slow/", views.slow, name="slow"),
    path("whoami/", views.whoami, name="whoami"),
    path("metrics/", metrics_view, name="metrics"),
]
