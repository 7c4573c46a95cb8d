"""Console pages for who may do what: API tokens, access rules, users and groups.

Every change made here is written to the audit log (console.audit), in addition to Django's own
admin history. Tokens are shown once, when created, and can only be revoked afterwards.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group
from django.db.models import QuerySet
from django.http import HttpRequest

from console import audit
from messaging import tokens
from messaging.models import AccessRule, ApiToken


class AuditedAdminMixin:
    """Mirror every add, change and delete done through this admin into the audit log."""

    audit_action = "change"

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        audit.record(user=request.user, action=f"{self.audit_action}.add", target=str(obj)[:420])
        return super().log_addition(request, obj, message)  # type: ignore[misc]

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        audit.record(
            user=request.user, action=f"{self.audit_action}.change", target=str(obj)[:420],
            details={"change": str(message)[:1000]},
        )  # fmt: skip
        return super().log_change(request, obj, message)  # type: ignore[misc]

    def log_deletions(self, request: HttpRequest, queryset: QuerySet[Any]) -> Any:
        for obj in queryset:
            audit.record(user=request.user, action=f"{self.audit_action}.delete", target=str(obj)[:420])
        return super().log_deletions(request, queryset)  # type: ignore[misc]


class SuperuserOnlyMixin:
    """Permissions are for admins (superusers) to grant, whatever model permissions staff hold."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.is_superuser)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_module_permission(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self.has_module_permission(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_module_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return self.has_module_permission(request)


@admin.register(AccessRule)
class AccessRuleAdmin(AuditedAdminMixin, SuperuserOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    audit_action = "access_rule"
    list_display = ("__str__", "user", "group", "kind", "pattern", "send", "consume", "browse", "manage")
    list_filter = ("kind", "send", "consume", "browse", "manage")
    search_fields = ("pattern", "user__username", "group__name")
    autocomplete_fields = ("user", "group")


class TokenCreateForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = ApiToken
        fields = ("user", "name", "expires_at")


@admin.register(ApiToken)
class ApiTokenAdmin(AuditedAdminMixin, SuperuserOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    audit_action = "api_token"
    list_display = ("user", "name", "prefix", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = ("revoked_at",)
    search_fields = ("user__username", "name", "prefix")
    readonly_fields = ("user", "name", "prefix", "created_at", "expires_at", "revoked_at", "last_used_at")
    actions = ("revoke",)
    autocomplete_fields = ("user",)

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = TokenCreateForm
        return super().get_form(request, obj, change, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.readonly_fields if obj is not None else ()

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a token is never edited: revoke it and make a new one

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        """Create the token through messaging.tokens and show it once."""
        raw = tokens.create_token(user=obj.user, name=obj.name, expires_at=obj.expires_at)
        created = ApiToken.objects.get(key_hash=tokens.hash_token(raw))
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = (
            created.pk,
            created.prefix,
            created.key_hash,
            created.created_at,
        )
        messages.warning(request, f"New token for {obj.user}: {raw} — copy it now, it is not shown again.")

    @admin.action(description="Revoke selected tokens (their live connections close)")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        count = audit.audited(
            user=request.user, action="api_token.revoke", target=", ".join(str(t) for t in queryset)[:420],
            operation=lambda: tokens.revoke(token_ids=ids), count=lambda n: n,
        )  # fmt: skip
        messages.success(request, f"Revoked {count} token(s).")


User = get_user_model()
for model in (User, Group):
    if admin.site.is_registered(model):
        admin.site.unregister(model)


@admin.register(User)
class AuditedUserAdmin(AuditedAdminMixin, UserAdmin):  # type: ignore[type-arg]
    audit_action = "user"


@admin.register(Group)
class AuditedGroupAdmin(AuditedAdminMixin, GroupAdmin):
    audit_action = "group"
