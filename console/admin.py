"""Read-only admin pages: the audit log."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from console.models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("at", "username", "action", "target", "messages", "outcome")
    list_filter = ("action", "outcome")
    search_fields = ("target", "username")
    date_hierarchy = "at"
    show_full_result_count = False  # no COUNT(*) over the whole log on every page
    list_per_page = 100

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)


from console import security_admin  # noqa: E402,F401  (registers tokens, access rules, users, groups)
