"""The console is Django's admin site with Pegasus pages added (installed as the default site,
so every app's `admin.site.register(...)` lands here)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path


class ConsoleSite(admin.AdminSite):
    site_header = "Pegasus console"
    site_title = "Pegasus console"
    index_title = "Overview"

    def has_permission(self, request: HttpRequest) -> bool:
        """Staff only (active staff users, as Django admin)."""
        return bool(request.user.is_active and request.user.is_staff)

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
        from console import views

        return views.overview_page(request)

    def get_urls(self) -> list[URLResolver | URLPattern]:
        from console import views

        wrap = self.admin_view
        ours: list[URLResolver | URLPattern] = [
            path("overview/body/", wrap(views.overview_fragment), name="console_overview_body"),
            path("q/<int:pk>/", wrap(views.destination), name="console_destination"),
            path("q/<int:pk>/stats/", wrap(views.destination_stats), name="console_destination_stats"),
            path("q/<int:pk>/m/<str:cursor>/", wrap(views.message), name="console_message"),
            path("q/<int:pk>/purge/", wrap(views.purge), name="console_purge"),
            path("q/<int:pk>/pause/", wrap(views.pause), name="console_pause"),
            path("q/<int:pk>/redrive/", wrap(views.redrive), name="console_redrive"),
            path("q/<int:pk>/selected/", wrap(views.bulk), name="console_bulk"),
            path("transactions/", wrap(views.transactions), name="console_transactions"),
            path("transactions/<str:txid>/<str:op>/", wrap(views.transaction_action), name="console_transaction"),
            path("consumers/", wrap(views.consumers), name="console_consumers"),
        ]
        return ours + super().get_urls()


class ConsoleAdminConfig(AdminConfig):
    """Replaces "django.contrib.admin" in INSTALLED_APPS: the console is the default admin site."""

    default_site = "console.site.ConsoleSite"
