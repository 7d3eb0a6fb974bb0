"""The notification e-mail: rendered from templates, sent over SMTP (in the worker only)."""

from __future__ import annotations

import html
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from string import Template
from urllib.parse import unquote, urlsplit

from taskapp.config import SMTPSettings
from taskapp.notifications.models import Notification

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


def message_id(notification: Notification) -> str:
    """Stable per notification: a resend after a crash carries the same Message-ID."""
    return f"<{notification.id}@taskapp>"


def render(notification: Notification, sender: str) -> EmailMessage:
    assert notification.recipient is not None
    fields = {
        "title": notification.payload["title"],
        "status": notification.payload["status"].replace("_", " "),
        "description": notification.payload.get("description") or "(none)",
        "task_id": str(notification.task_id),
    }
    message = EmailMessage()
    # Titles are user text: no line breaks may reach a header.
    message["Subject"] = _CONTROL.sub(" ", SUBJECT.substitute(fields))[:200]
    message["From"] = sender
    message["To"] = notification.recipient
    message["Message-ID"] = message_id(notification)
    message["Date"] = formatdate(localtime=False)
    message.set_content(TEXT.substitute(fields))
    message.add_alternative(
        HTML.substitute({k: html.escape(v) for k, v in fields.items()}), subtype="html"
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
