"""The load of a chaos run: an asyncio client outside the server processes that keeps a
steady mix of creates and reads going and remembers every answer, above all the id of
every task answered 201, to compare with the database afterwards."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Answer:
    method: str
    started: float  # time.monotonic()
    elapsed: float
    status: int | None  # None: no HTTP answer (see `error`)
    error: str | None = None
    code: str | None = None  # the `code` of a 4xx/5xx
    title: str | None = None  # of the task a POST would create


@dataclass
class Load:
    """`concurrency` clients, each with a user token of its own, until `stop()`.

    `write_share` of the requests are `POST /tasks` (title `chaos <run> <n>`), the rest
    `GET /tasks` or `GET /tasks/{id}` of a task the same client created."""

    base_url: str
    tokens: list[str]
    run: str
    concurrency: int = 16
    write_share: float = 0.5
    timeout: float = 15.0
    keepalive: bool = True
    think: float = 0.0  # seconds each client waits between its requests
    answers: list[Answer] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=dict)  # task id -> title
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _numbers: itertools.count[int] = field(default_factory=itertools.count)

    def stop(self) -> None:
        """No new request from now on; those under way run to their answer."""
        self._stopping.set()

    async def drive(self) -> None:
        limits = httpx.Limits(
            max_connections=self.concurrency,
            max_keepalive_connections=self.concurrency if self.keepalive else 0,
        )
        async with httpx.AsyncClient(
            base_url=self.base_url, limits=limits, timeout=self.timeout
        ) as client:
            await asyncio.gather(
                *(self._client(client, self.tokens[i % len(self.tokens)], i)
                  for i in range(self.concurrency))
            )  # fmt: skip

    async def _client(self, client: httpx.AsyncClient, token: str, seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - which request next, not a secret  # nosec B311
        headers = {"Authorization": f"Bearer {token}"}
        mine: list[str] = []
        while not self._stopping.is_set():
            if self.think:
                await asyncio.sleep(self.think)
            if not mine or rng.random() < self.write_share:
                title = f"chaos {self.run} {next(self._numbers)}"
                answer, body = await self._send(
                    client, "POST", "/tasks", headers, json={"title": title}
                )
                if answer.status == 201 and isinstance(body, dict):
                    self.created[body["id"]] = title
                    mine.append(body["id"])
            elif rng.random() < 0.5:
                await self._send(client, "GET", "/tasks?page=1&page_size=10", headers)
            else:
                await self._send(client, "GET", f"/tasks/{rng.choice(mine)}", headers)

    async def _send(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        headers: dict[str, str],
        json: object = None,
    ) -> tuple[Answer, object]:
        started = time.monotonic()
        title = json.get("title") if isinstance(json, dict) else None
        try:
            response = await client.request(method, path, headers=headers, json=json)
        except httpx.HTTPError as exc:
            elapsed = time.monotonic() - started
            answer = Answer(method, started, elapsed, None, type(exc).__name__, title=title)
            self.answers.append(answer)
            # A refused connection answers at once; don't spin on it.
            await asyncio.sleep(0.05)
            return answer, None
        elapsed = time.monotonic() - started
        try:
            body = response.json()
        except ValueError:
            body = None
        code = body.get("code") if isinstance(body, dict) and response.is_error else None
        answer = Answer(method, started, elapsed, response.status_code, None, code, title)
        self.answers.append(answer)
        if response.status_code >= 500:
            await asyncio.sleep(0.05)  # as a client honouring Retry-After would, briefly
        return answer, body


@dataclass(frozen=True)
class Tally:
    sent: int
    by_status: Counter[int]
    errors: Counter[str]
    longest: float  # seconds, the slowest answer (or error)

    @classmethod
    def of(cls, answers: list[Answer]) -> Tally:
        return cls(
            sent=len(answers),
            by_status=Counter(a.status for a in answers if a.status is not None),
            errors=Counter(a.error for a in answers if a.error is not None),
            longest=max((a.elapsed for a in answers), default=0.0),
        )

    def count(self, low: int, high: int) -> int:
        return sum(n for status, n in self.by_status.items() if low <= status < high)
