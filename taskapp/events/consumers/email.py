"""The e-mail a task's creator receives: rendered from templates, sent over SMTP (in the
worker only), to the address the creator's token carried."""

from __future__ import annotations

import html
import re
import smtplib
import ssl
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from functools import lru_cache
from string import Template
from urllib.parse import unquote, urlsplit

from taskapp.config import SMTPSettings
from taskapp.events.consumer import Consumer, DeliveryFailed
from taskapp.events.event import NewEvent
from taskapp.events.models import Event
from taskapp.observability.metrics import NOTIFICATIONS

TASK_CREATED = "task_created"
TASK_ASSIGNED = "task_assigned"

SUBJECT = Template("New task: $title")
TEXT = Template(
    "Hello,\n\nyour task was created.\n\n"
    "Title:       $title\nStatus:      $status\nDescription: $description\nId:          $task_id\n"
)
HTML = Template(
    "<html><body><p>Hello,</p><p>your task was created.</p>"
    "<table><tr><th align='left'>Title</th><td>$title</td></tr>"
    "<tr><th align='left'>Status</th><td>$status</td></tr>"
    "<tr><th align='left'>Description</th><td>$description</td></tr>"
    "<tr><th align='left'>Id</th><td>$task_id</td></tr></table></body></html>"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# A plain address: nothing that could smuggle a header, a group or a second recipient.
_ADDRESS = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def usable_address(email: object) -> str | None:
    """`email` when it is one plain address the mail library reads back unchanged."""
    if not isinstance(email, str) or not email or len(email) > 320:
        return None
    return _usable(email)


# The mail library's parser is slow, and a user's address comes with each of their changes.
@lru_cache(maxsize=16_384)
def _usable(email: str) -> str | None:
    if not _ADDRESS.match(email):
        return None
    try:
        parsed = Address(addr_spec=email).addr_spec
    except Exception:  # the stdlib parser raises assorted errors on odd input
        return None
    return email if parsed == email else None


ASSIGNED_SUBJECT = Template("Assigned to you: $title")
ASSIGNED_TEXT = Template(
    "Hello,\n\n$assigned_by assigned a task to you.\n\n"
    "Title:   $title\nProject: $project\nLink:    $link\n"
)
ASSIGNED_HTML = Template(
    "<html><body><p>Hello,</p><p>$assigned_by assigned a task to you.</p>"
    "<table><tr><th align='left'>Title</th><td>$title</td></tr>"
    "<tr><th align='left'>Project</th><td>$project</td></tr></table>"
    "<p><a href='$link'>$link</a></p></body></html>"
)


def message_id(event: Event) -> str:
    """Stable per event: a resend after a crash carries the same Message-ID."""
    return f"<{event.id}@taskapp>"


def render(event: Event, recipient: str, sender: str, *, link_base: str = "") -> EmailMessage:
    """The message of `event` (a creation or an assignment) to `recipient`."""
    subject, text, markup = SUBJECT, TEXT, HTML
    if event.kind == TASK_ASSIGNED:
        subject, text, markup = ASSIGNED_SUBJECT, ASSIGNED_TEXT, ASSIGNED_HTML
        fields = {
            "title": event.payload["title"],
            "project": event.payload["project"],
            "assigned_by": _CONTROL.sub(" ", event.payload["assigned_by"]),
            "link": f"{link_base.rstrip('/')}/tasks/{event.aggregate_id}",
        }
    else:
        fields = {
            "title": event.payload["title"],
            "status": event.payload["status"].replace("_", " "),
            "description": event.payload.get("description") or "(none)",
            "task_id": str(event.aggregate_id),
        }
    message = EmailMessage()
    # Titles are user text: no line breaks may reach a header.
    message["Subject"] = _CONTROL.sub(" ", subject.substitute(fields))[:200]
    message["From"] = sender
    message["To"] = recipient
    message["Message-ID"] = message_id(event)
    message["Date"] = formatdate(localtime=False)
    message.set_content(text.substitute(fields))
    message.add_alternative(
        markup.substitute({k: html.escape(v) for k, v in fields.items()}), subtype="html"
    )
    return message


def send(message: EmailMessage, settings: SMTPSettings) -> None:
    """Deliver one message; raises smtplib.SMTPException or OSError on failure."""
    assert settings.url is not None
    url = urlsplit(settings.url.get_secret_value())
    host, secure = url.hostname or "localhost", url.scheme == "smtps"
    port = url.port or (465 if secure else 25)
    username = unquote(url.username) if url.username else settings.username
    password = (
        unquote(url.password)
        if url.password
        else (settings.password.get_secret_value() if settings.password else None)
    )
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if secure:
        smtp = smtplib.SMTP_SSL(host, port, timeout=settings.timeout, context=context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=settings.timeout)
    with smtp:
        if settings.starttls and not secure:
            smtp.starttls(context=context)
        if username and password:
            smtp.login(username, password)
        smtp.send_message(message)


def is_permanent(exc: BaseException) -> bool:
    """The server refused this message or its recipient for good (5xx to RCPT or DATA).

    A 5xx to the greeting, STARTTLS, login or the sender is about our configuration or the
    server's state, not the message: those are retried like any temporary failure.
    """
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(500 <= code < 600 for code, _ in exc.recipients.values())
    return isinstance(exc, smtplib.SMTPDataError) and 500 <= exc.smtp_code < 600


class EmailConsumer(Consumer):
    """Mails the creator of a task, at the address their token carried when they made it,
    and whoever someone else assigns to a task, at the address the directory has for them
    (from their own token)."""

    name = "email"
    kinds = frozenset({TASK_CREATED, TASK_ASSIGNED})
    outcomes = NOTIFICATIONS

    def __init__(self, settings: SMTPSettings, *, link_base: str = "") -> None:
        self.settings = settings
        self.link_base = link_base

    def target(self, event: NewEvent) -> str | None:
        return usable_address(event.payload.get("email"))

    def deliver(self, event: Event, target: str) -> None:
        try:
            message = render(event, target, self.settings.from_address, link_base=self.link_base)
        except Exception as exc:  # a message that cannot be built never will be
            raise DeliveryFailed(exc, permanent=True) from exc
        try:
            send(message, self.settings)
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryFailed(exc, permanent=is_permanent(exc)) from exc
