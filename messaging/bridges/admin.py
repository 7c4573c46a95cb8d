"""Bridges in the operator console (the Django admin at /console/): admins only.

The token field is write-only: the form never renders it back, and leaving it blank on an edit
keeps the stored one. Validation and saving go through messaging.bridges.services, like the API.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from messaging import access, broker
from messaging.bridges import services
from messaging.bridges.models import Bridge
from messaging.exceptions import BrokerError


class BridgeForm(forms.ModelForm):  # type: ignore[type-arg]
    target_token = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="An API token of the target server. Write-only: leave blank to keep the current one.",
    )

    class Meta:
        model = Bridge
        fields = ["name", "enabled", "source_topic", "source_name", "target_url", "target_kind", "target_name",
                  "target_token", "batch_size"]  # fmt: skip

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        values = {field: data.get(field) for field in services.EDITABLE}
        if not values["target_token"]:
            if not self.instance.pk:
                raise ValidationError({"target_token": "A new bridge needs the target's token."})
            values["target_token"] = self.instance.target_token
        try:
            if not self.instance.pk:
                broker.validate_name(data.get("name", ""))
            data.update(services.validated(values))
        except BrokerError as exc:
            raise ValidationError(exc.message) from None
        return data


def _is_admin(request: HttpRequest) -> bool:
    try:
        access.require_admin(request.user)
    except BrokerError:
        return False
    return True


@admin.register(Bridge)
class BridgeAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    form = BridgeForm
    list_display = ["name", "enabled", "status", "source_label", "target_label", "forwarded", "lag", "last_success",
                    "last_error"]  # fmt: skip
    list_select_related = ["state"]
    search_fields = ["name", "source_name", "target_name"]
    actions = ["enable", "disable"]
    readonly_fields = ["status", "forwarded", "duplicates", "retries", "lag", "last_error", "last_error_at",
                       "last_success", "runner", "heartbeat"]  # fmt: skip
    fieldsets = [
        (None, {"fields": ["name", "enabled"]}),
        ("Source (this server)", {"fields": ["source_topic", "source_name"]}),
        ("Target (another Pegasus server)", {"fields": ["target_url", "target_kind", "target_name", "target_token"]}),
        ("Forwarding", {"fields": ["batch_size"]}),
        ("State", {"fields": tuple(readonly_fields)}),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        # The name is fixed once created: it is the bridge's handle in the API.
        return [*self.readonly_fields, "name"] if obj is not None else list(self.readonly_fields)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return _is_admin(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _is_admin(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return _is_admin(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _is_admin(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _is_admin(request)

    def save_model(self, request: HttpRequest, obj: Bridge, form: Any, change: bool) -> None:
        values = {field: form.cleaned_data[field] for field in services.EDITABLE}
        if change:
            services.update_bridge(bridge=obj, changes=values)
        else:
            saved = services.create_bridge(name=form.cleaned_data["name"], **values)
            obj.pk, obj.uid = saved.pk, saved.uid

    def delete_model(self, request: HttpRequest, obj: Bridge) -> None:
        services.delete_bridge(bridge=obj)

    @admin.action(description="Enable the selected bridges")
    def enable(self, request: HttpRequest, queryset: QuerySet[Bridge]) -> None:
        self._set_enabled(request, queryset, enabled=True)

    @admin.action(description="Disable the selected bridges (their runners stop after the current batch)")
    def disable(self, request: HttpRequest, queryset: QuerySet[Bridge]) -> None:
        self._set_enabled(request, queryset, enabled=False)

    def _set_enabled(self, request: HttpRequest, queryset: QuerySet[Bridge], *, enabled: bool) -> None:
        done = 0
        for bridge in queryset:
            try:
                services.update_bridge(bridge=bridge, changes={"enabled": enabled})
                done += 1
            except BrokerError as exc:  # enabling re-checks the source and the target
                self.message_user(request, f"{bridge.name}: {exc.message}", messages.ERROR)
        self.message_user(request, f"{done} bridge(s) {'enabled' if enabled else 'disabled'}.", messages.SUCCESS)

    # ------------------------------------------------------------------ state columns

    def _status(self, obj: Bridge) -> services.BridgeStatus:
        # One status per object and request: the change list calls several columns per row.
        cached: services.BridgeStatus | None = getattr(obj, "_status_cache", None)
        if cached is None:
            cached = services.bridge_status(obj)
            obj._status_cache = cached  # type: ignore[attr-defined]
        return cached

    @admin.display(description="status")
    def status(self, obj: Bridge) -> str:
        return self._status(obj).status if obj.pk else "-"

    @admin.display(description="forwarded")
    def forwarded(self, obj: Bridge) -> int:
        return self._status(obj).forwarded if obj.pk else 0

    @admin.display(description="of which duplicates")
    def duplicates(self, obj: Bridge) -> int:
        return self._status(obj).duplicates if obj.pk else 0

    @admin.display(description="failed attempts")
    def retries(self, obj: Bridge) -> int:
        return self._status(obj).retries if obj.pk else 0

    @admin.display(description="lag (waiting)")
    def lag(self, obj: Bridge) -> str:
        lag = self._status(obj).lag if obj.pk else 0
        return "source missing" if lag is None else str(lag)

    @admin.display(description="last error")
    def last_error(self, obj: Bridge) -> str:
        return (self._status(obj).last_error or "-") if obj.pk else "-"

    @admin.display(description="last error at")
    def last_error_at(self, obj: Bridge) -> Any:
        return self._status(obj).last_error_at if obj.pk else None

    @admin.display(description="last success")
    def last_success(self, obj: Bridge) -> Any:
        return self._status(obj).last_success_at if obj.pk else None

    @admin.display(description="runner")
    def runner(self, obj: Bridge) -> str:
        return (self._status(obj).runner or "-") if obj.pk else "-"

    @admin.display(description="heartbeat")
    def heartbeat(self, obj: Bridge) -> Any:
        return self._status(obj).heartbeat_at if obj.pk else None
