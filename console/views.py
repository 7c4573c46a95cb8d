"""Console pages beyond the stock admin: overview, browse, one message, actions, transactions, consumers.

Each view is an interface in the sense of STYLE.md R1: it checks permission with
`messaging.access`, calls one broker (or queries) function, records operator actions in the
audit log (console/audit.py) and renders. The admin site wraps every view in `admin_view`
(staff only, login, CSRF on POST, never cached).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import wraps
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from console import audit, overview
from console import render as bodies
from messaging import access, broker, queries
from messaging.exceptions import BrokerError, InvalidRequest, NotFound, TransactionStateError
from messaging.exceptions import PermissionDenied as BrokerPermissionDenied
from messaging.models import Queue, TxState

View = Callable[..., HttpResponse]

PAGE_SIZE = 50
# Header names go into a JSON key lookup: no "__" (Django would read it as a lookup chain).
HEADER_NAME = re.compile(r"^(?!.*__)[A-Za-z0-9_.:-]{1,200}$")


def console_view(view: View) -> View:
    """Broker permission and lookup errors become 403/404. (Every console page also gets a
    Content-Security-Policy without inline scripts: pegasus_site/middleware.py.)"""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            response = view(request, *args, **kwargs)
        except BrokerPermissionDenied as error:
            raise PermissionDenied(error.message) from error
        except NotFound as error:
            raise Http404(error.message) from error
        return response

    return wrapper


def _context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    return {**admin.site.each_context(request), **extra}


def _queue(pk: int) -> Queue:
    return get_object_or_404(Queue.objects.select_related("topic", "dead_letter_queue"), pk=pk)


def _require(request: HttpRequest, queue: Queue, action: access.Action) -> None:
    if queue.topic is not None:
        access.require(request.user, action, kind=access.Kind.TOPIC, name=queue.topic.name)
    else:
        access.require(request.user, action, kind=access.Kind.QUEUE, name=queue.name)


def _back(request: HttpRequest, queue: Queue) -> HttpResponseRedirect:
    """Back to where the form was posted from (same host only), else the destination page."""
    nxt = request.POST.get("next", "")
    if nxt and url_has_allowed_host_and_scheme(nxt, allowed_hosts={request.get_host()}):
        return HttpResponseRedirect(nxt)
    return HttpResponseRedirect(reverse("admin:console_destination", args=[queue.pk]))


# --------------------------------------------------------------------------- overview


def overview_page(request: HttpRequest) -> TemplateResponse:
    """The console's home page (the admin site's index)."""
    ctx = _context(request, title="Overview", ov=overview.overview(), app_list=admin.site.get_app_list(request))
    return TemplateResponse(request, "console/overview.html", ctx)


@console_view
@require_GET
def overview_fragment(request: HttpRequest) -> HttpResponse:
    return render(request, "console/_overview_body.html", {"ov": overview.overview()})


# --------------------------------------------------------------------------- one destination


class BrowseForm(forms.Form):
    state = forms.ChoiceField(
        required=False, choices=[("", "any state"), *((s, s.replace("_", " ")) for s in queries.BROWSE_STATES)]
    )
    header = forms.CharField(required=False, max_length=200, label="header")
    value = forms.CharField(required=False, max_length=1000, label="equals")
    after = forms.RegexField(required=False, regex=r"^[dt]\d{1,18}$")

    def clean_header(self) -> str:
        name: str = self.cleaned_data["header"]
        if name and not HEADER_NAME.match(name):
            raise forms.ValidationError("Header names here: letters, digits and . _ : - (no double underscore).")
        return name


@console_view
@require_GET
def destination(request: HttpRequest, pk: int) -> HttpResponse:
    queue = _queue(pk)
    _require(request, queue, access.Action.BROWSE)
    form = BrowseForm(request.GET or None)
    rows: list[queries.BrowsedMessage] = []
    resume: str | None = None
    if form.is_bound and not form.is_valid():
        messages.error(request, "Check the filter.")
    else:
        rows, resume = _browse(queue, form.cleaned_data if form.is_bound else {})
    next_query = request.GET.copy()
    next_query["after"] = resume or ""
    first_query = request.GET.copy()
    first_query.pop("after", None)
    ctx = _context(
        request,
        title=f"{'Subscription' if queue.topic else 'Queue'} {queue.label}",
        queue=queue,
        r=overview.destination_row(queue),
        form=form,
        rows=[(row, bodies.preview(row.body, row.content_type)) for row in rows],
        has_more=resume is not None,
        next_query=next_query.urlencode(),
        first_query=first_query.urlencode(),
        paged=bool(request.GET.get("after")),
        page_size=PAGE_SIZE,
        targets=Queue.objects.filter(topic__isnull=True).exclude(pk=queue.pk).order_by("name")[:500],
        this_url=request.get_full_path(),
    )
    return render(request, "console/destination.html", ctx)


def _browse(queue: Queue, data: dict[str, Any]) -> tuple[list[queries.BrowsedMessage], str | None]:
    """One page and the cursor of the next (None at the end). Unfiltered pages are a plain
    keyset read; filtered ones scan a bounded window of the queue per page (browse_window), so
    a rare match on a huge queue costs several quick pages, never one long scan."""
    after = data.get("after") or None
    if not data.get("state") and not data.get("header"):
        rows = queries.browse(queue, after=after, limit=PAGE_SIZE + 1)
        more = len(rows) > PAGE_SIZE  # one row more than a page says "there is a next page"
        return rows[:PAGE_SIZE], rows[PAGE_SIZE - 1].cursor if more else None
    header = (data["header"], data["value"]) if data.get("header") else None
    return queries.browse_window(queue, state=data.get("state") or None, after=after, limit=PAGE_SIZE, header=header)


@console_view
@require_GET
def destination_stats(request: HttpRequest, pk: int) -> HttpResponse:
    queue = _queue(pk)
    _require(request, queue, access.Action.BROWSE)
    return render(request, "console/_destination_stats.html", {"r": overview.destination_row(queue)})


@console_view
@require_GET
def message(request: HttpRequest, pk: int, cursor: str) -> HttpResponse:
    queue = _queue(pk)
    _require(request, queue, access.Action.BROWSE)
    found = queries.browse_one(queue, cursor)
    if found is None:
        raise Http404("That message is gone (acknowledged, moved or deleted).")
    ctx = _context(
        request,
        title=f"Message {found.id}",
        queue=queue,
        m=found,
        body=bodies.render_body(found.body, found.content_type),
        headers=sorted(found.headers.items()),
        targets=Queue.objects.filter(topic__isnull=True).exclude(pk=queue.pk).order_by("name")[:500],
        this_url=request.get_full_path(),
    )
    return render(request, "console/message.html", ctx)


# --------------------------------------------------------------------------- actions


@console_view
def purge(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: a confirmation stating how many messages would go. POST: purge."""
    queue = _queue(pk)
    _require(request, queue, access.Action.MANAGE)
    if request.method != "POST":
        ctx = _context(request, title=f"Purge {queue.label}?", queue=queue, count=queries.purgeable_count(queue))
        return render(request, "console/purge_confirm.html", ctx)
    return _act(
        request, queue, "purge", lambda: broker.purge_queue(queue=queue), "Purged {n} messages from {q}.", count=int
    )


@console_view
@require_POST
def pause(request: HttpRequest, pk: int) -> HttpResponse:
    queue = _queue(pk)
    _require(request, queue, access.Action.MANAGE)
    paused = request.POST.get("paused") == "1"
    return _act(
        request, queue, "pause" if paused else "resume",
        lambda: broker.set_paused(queue=queue, paused=paused),
        f"Delivery from {{q}} is {'paused' if paused else 'resumed'}.",
    )  # fmt: skip


@console_view
@require_POST
def redrive(request: HttpRequest, pk: int) -> HttpResponse:
    """Retry all dead letters of this queue to where they came from."""
    queue = _queue(pk)
    _require(request, queue, access.Action.MANAGE)
    return _act(
        request, queue, "retry_all", lambda: broker.redrive(queue=queue), "Sent {n} dead letters back from {q}.", int
    )


class BulkForm(forms.Form):
    action = forms.ChoiceField(choices=[(a, a) for a in ("delete", "move", "copy", "retry", "priority")])
    cursor = forms.MultipleChoiceField(required=True)  # choices are checked by the broker (parse_cursors)
    target = forms.CharField(required=False, max_length=200)
    priority = forms.IntegerField(required=False, min_value=0, max_value=9)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["cursor"].valid_value = lambda value: True  # type: ignore[attr-defined]


@console_view
@require_POST
def bulk(request: HttpRequest, pk: int) -> HttpResponse:
    """Delete, move, copy, retry or re-prioritise the selected messages."""
    queue = _queue(pk)
    _require(request, queue, access.Action.MANAGE)
    form = BulkForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Select messages and an action (and a target queue or a priority 0-9).")
        return _back(request, queue)
    try:
        operation, done, details = _bulk_operation(request, queue, form.cleaned_data)
    except BrokerError as error:
        messages.error(request, error.message)
        return _back(request, queue)
    return _act(request, queue, form.cleaned_data["action"], operation, done, int, details)


def _bulk_operation(
    request: HttpRequest, queue: Queue, data: dict[str, Any]
) -> tuple[Callable[[], int], str, dict[str, Any]]:
    """The broker call for one bulk action, the message to show ("{n}" is filled in) and the
    details for the audit log."""
    action, picked = data["action"], data["cursor"]
    details: dict[str, Any] = {"selected": len(picked)}
    of = f"{{n}} of {len(picked)} selected"
    if action in ("move", "copy"):
        target = access.access_queue(user=request.user, name=data["target"] or "", action=access.Action.MANAGE)
        details["target"] = target.label
        verb = "moved" if action == "move" else "copied"
        return (
            lambda: broker.move_messages(queue=queue, cursors=picked, target=target, copy=action == "copy"),
            f"{of} messages {verb} to {target.label}.",  # names have no braces (NAME_PATTERN)
            details,
        )
    if action == "priority":
        priority = data["priority"]
        if priority is None:
            raise InvalidRequest("Pick a priority from 0 to 9.")
        details["priority"] = priority
        return (
            lambda: broker.set_priority(queue=queue, cursors=picked, priority=priority),
            f"{of} messages now have priority {priority}.",
            details,
        )
    if action == "retry":
        return (
            lambda: broker.retry_dead_letters(queue=queue, cursors=picked),
            f"{of} dead letters sent back to where they came from.",
            details,
        )
    return (lambda: broker.delete_messages(queue=queue, cursors=picked), f"{of} messages deleted.", details)


def _act(
    request: HttpRequest,
    queue: Queue,
    action: str,
    operation: Callable[[], Any],
    done: str,
    count: Callable[[Any], int | None] = lambda _: None,
    details: dict[str, Any] | None = None,
) -> HttpResponse:
    """Run an audited broker operation on `queue`, report the outcome, go back."""
    try:
        result = audit.audited(
            user=request.user, action=action, target=queue.label, operation=operation, count=count, details=details
        )
        overview.forget(queue.pk)
        if details and "target" in details:
            overview.forget()
    except BrokerError as error:
        messages.error(request, f"{action}: {error.message}")
    else:
        messages.success(request, done.format(n=result, q=queue.label))
    return _back(request, queue)


# --------------------------------------------------------------------------- transactions, consumers


@console_view
@require_GET
def transactions(request: HttpRequest) -> HttpResponse:
    ctx = _context(request, title="Transactions", txns=overview.transactions(user=request.user))
    return render(request, "console/transactions.html", ctx)


@console_view
@require_POST
def transaction_action(request: HttpRequest, txid: str, op: str) -> HttpResponse:
    """Commit or roll back a prepared (in-doubt) transaction."""
    if op not in ("commit", "rollback"):
        raise Http404()
    # The broker lets superusers finish any transaction and others only their own.
    txn = broker.get_transaction(transaction_id=txid, user=request.user)
    finish = broker.commit if op == "commit" else broker.rollback

    def operation() -> Any:
        if txn.state != TxState.PREPARED:  # open ones belong to their client; it may still commit
            raise TransactionStateError(f"Only prepared transactions are finished here; this one is {txn.state}.")
        return finish(transaction_id=txn.pk, user=request.user)

    try:
        target = f"transaction {txn.pk}"
        audit.audited(user=request.user, action=f"transaction_{op}", target=target, operation=operation)
    except BrokerError as error:
        messages.error(request, f"{op}: {error.message}")
    else:
        messages.success(request, f"Transaction {txn.pk} {'committed' if op == 'commit' else 'rolled back'}.")
    return HttpResponseRedirect(reverse("admin:console_transactions"))


@console_view
@require_GET
def consumers(request: HttpRequest) -> HttpResponse:
    ctx = _context(request, title="Live consumers", consumers=overview.live_consumers())
    return render(request, "console/consumers.html", ctx)
