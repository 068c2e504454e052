"""The Django admin for operators: accounts and their parked messages, replay and skip, partitions."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import Case, Count, IntegerField, OuterRef, QuerySet, Subquery, Value, When
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator

from . import actions
from .exceptions import OrderedTaskError
from .models import AccountState, ControlRequest, ParkedMessage, PartitionStatus
from .states import ControlAction, KeyStatus

#: The permission that allows replay and skip (codename ``replay_accountstate``).
REPLAY_PERMISSION = "ordered_tasks.replay_accountstate"
VIEW_PERMISSION = "ordered_tasks.view_accountstate"
#: Seconds between two automatic reloads of the partitions page.
REFRESH_SECONDS = 5

_URGENCY = Case(When(status=KeyStatus.BLOCKED, then=Value(0)), When(status=KeyStatus.RETRYING, then=Value(1)),
                default=Value(2),
                output_field=IntegerField())


class ReadOnly:
    """Nobody adds, edits or deletes these rows by hand: only the workers, replay and skip write."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


if TYPE_CHECKING:
    _AccountAdmin = admin.ModelAdmin[AccountState]
    _PartitionAdmin = admin.ModelAdmin[PartitionStatus]
else:  # ModelAdmin is generic for type checkers only
    _AccountAdmin = _PartitionAdmin = admin.ModelAdmin

_SECTIONS: tuple[tuple[str | None, tuple[str, ...]], ...] = (
    (None, ("key", "partition", "status", "retry_at", "results")),
    ("Last error", ("last_error_text", "last_error_at", "blocked_at")),
    ("Parked messages, in the order they will run", ("parked_messages",)),
    ("Replays and skips", ("history",)),
    ("Counters", ("failures", "retries", "blocks", "replays", "skips")),
    ("Timestamps", ("created_at", "updated_at", "last_activity")),
)


def _parked_count() -> Subquery:
    rows = (ParkedMessage.objects.filter(key=OuterRef("key"), state=ParkedMessage.State.PARKED)
            .order_by().values("key").annotate(n=Count("pk")).values("n"))
    return Subquery(rows, output_field=IntegerField())


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=repr)


def _results_installed() -> bool:
    return apps.is_installed("django_celery_results")


@admin.register(AccountState)
class AccountStateAdmin(ReadOnly, _AccountAdmin):
    """Keys that left the happy path: why they are stuck, and replay or skip."""

    list_display = ("key", "partition", "status", "parked", "short_error", "last_activity")
    list_filter = ("status", "partition")
    search_fields = ("key",)
    ordering = (_URGENCY.asc(), "-last_activity", "key")
    actions = ["replay", "skip"]
    list_per_page = 50
    fieldsets = tuple((title, {"fields": fields}) for title, fields in _SECTIONS)
    readonly_fields = tuple(name for _, fields in _SECTIONS for name in fields)

    def get_queryset(self, request: HttpRequest) -> QuerySet[AccountState]:
        return super().get_queryset(request).annotate(parked_count=Coalesce(_parked_count(), 0))


    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(REPLAY_PERMISSION)

    @admin.display(description="parked", ordering="parked_count")
    def parked(self, obj: AccountState) -> int:
        return int(getattr(obj, "parked_count", 0) or 0)

    @admin.display(description="last error")
    def short_error(self, obj: AccountState) -> str:
        return Truncator(obj.last_error.splitlines()[0] if obj.last_error else "").chars(80)

    @admin.display(description="last error")
    def last_error_text(self, obj: AccountState) -> SafeString:
        return format_html("<pre style='white-space: pre-wrap'>{}</pre>", obj.last_error or "-")

    @admin.display(description="task results")
    def results(self, obj: AccountState) -> SafeString | str:
        if not _results_installed():
            return "-"
        url = reverse("admin:django_celery_results_taskresult_changelist")
        return format_html('<a href="{}?q={}">Results of tasks whose arguments mention this key</a>',
                           url, obj.key)

    @admin.display(description="parked messages")
    def parked_messages(self, obj: AccountState) -> SafeString | str:
        rows = list(ParkedMessage.objects.filter(key=obj.key).order_by("position"))
        if not rows:
            return "None."
        return format_html(
            "<table><thead><tr><th>#</th><th>state</th><th>reason</th><th>task</th><th>arguments</th>"
            "<th>exception</th><th>attempts</th><th>parked / due</th></tr></thead><tbody>{}</tbody></table>",
            format_html_join("", "<tr>{}</tr>", ((self._parked_row(row),) for row in rows)),
        )

    def _parked_row(self, row: ParkedMessage) -> SafeString:
        arguments = row.arguments()
        if arguments is None:
            shown = format_html("<em>{} body, not shown</em>", row.content_type or "unknown")
        else:
            args, kwargs = arguments
            shown = format_html("<pre>args = {}\nkwargs = {}</pre>", _pretty(args), _pretty(kwargs))
        task = format_html("{}<br><small>{}</small>", row.task_name or "?", row.task_id or "")
        if _results_installed() and row.task_id:
            url = reverse("admin:django_celery_results_taskresult_changelist")
            task = format_html('{} <a href="{}?task_id={}">result</a>', task, url, row.task_id)
        exception = format_html("{}<details><summary>traceback</summary><pre>{}</pre></details>",
                                row.exception or "-", row.traceback or "-") if row.traceback else (
                                    row.exception or "-")
        return format_html(
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}<br>{}</td>",
            row.position, row.state, row.get_reason_display(), task, shown, exception, row.attempts,
            row.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            row.due_at.strftime("due %H:%M:%S") if row.due_at else "",
        )

    @admin.display(description="history")
    def history(self, obj: AccountState) -> SafeString | str:
        requests = ControlRequest.objects.filter(key=obj.key).order_by("-requested_at", "-id")[:50]
        if not requests:
            return "No replay or skip yet."
        return format_html(
            "<table><thead><tr><th>action</th><th>by</th><th>requested</th><th>applied</th><th>outcome</th>"
            "</tr></thead><tbody>{}</tbody></table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", (
                (r.action, r.requested_by or "-", r.requested_at.strftime("%Y-%m-%d %H:%M:%S"),
                 r.applied_at.strftime("%Y-%m-%d %H:%M:%S") if r.applied_at else "pending", r.outcome or "-")
                for r in requests)),
        )

    @admin.action(description="Replay the parked messages of the selected accounts", permissions=["replay"])
    def replay(self, request: HttpRequest, queryset: QuerySet[AccountState]) -> HttpResponse | None:
        return self._control(request, queryset, ControlAction.REPLAY)

    @admin.action(description="Skip the failed message of the selected accounts, then run the rest",
                  permissions=["replay"])
    def skip(self, request: HttpRequest, queryset: QuerySet[AccountState]) -> HttpResponse | None:
        return self._control(request, queryset, ControlAction.SKIP)

    def _control(self, request: HttpRequest, queryset: QuerySet[AccountState],
                 action: ControlAction) -> HttpResponse | None:
        """Django's ``delete_selected`` pattern: confirm first, act on ``post=yes``."""
        if request.POST.get("post") == "yes":
            apply = actions.replay if action == ControlAction.REPLAY else actions.skip
            done, refused = [], []
            for state in queryset:
                try:
                    apply(state.key, requested_by=request.user.get_username())
                except OrderedTaskError as exc:
                    refused.append(f"{state.key}: {exc}")
                    continue
                self.log_change(request, state, f"Requested a {action}.")
                done.append(state.key)
            if done:
                self.message_user(request, f"Requested a {action} of {len(done)} account(s); the workers "
                                  "apply it in order, after the messages already queued.", messages.SUCCESS)
            for reason in refused:
                self.message_user(request, reason, messages.WARNING)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": f"Confirm: {action}",
            "action": action,
            "queryset": queryset.order_by("key"),
            "opts": self.model._meta,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media,
        }
        return TemplateResponse(request, "admin/ordered_tasks/accountstate/confirm_action.html", context)


@admin.register(PartitionStatus)
class PartitionStatusAdmin(ReadOnly, _PartitionAdmin):
    """The partitions page, listed in the admin index; read by those who may view accounts."""

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.partitions_view)
        return [path("", view, name="ordered_tasks_partitions"), *super().get_urls()]

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(VIEW_PERMISSION)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(VIEW_PERMISSION)

    def partitions_view(self, request: HttpRequest) -> HttpResponse:
        from django.core.exceptions import PermissionDenied

        from .dashboard import overview
        from .health import SILENT_AFTER, STALL_AFTER

        if not self.has_view_permission(request):
            raise PermissionDenied
        rows, broker_error = overview()
        context = {
            **self.admin_site.each_context(request),
            "title": "Partitions",
            "opts": self.model._meta,
            "rows": rows,
            "broker_error": broker_error,
            "refresh": REFRESH_SECONDS,
            "silent_after": int(SILENT_AFTER),
            "stall_after": STALL_AFTER,
            "accounts_url": reverse("admin:ordered_tasks_accountstate_changelist"),
        }
        return TemplateResponse(request, "admin/ordered_tasks/partitions.html", context)
