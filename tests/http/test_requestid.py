"""Generated request ids: unique within a process, and after a fork in the child too."""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection

from taskapp.http.requestid import new_request_id


def test_ids_are_unique_and_safe() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def _child(pipe: Connection) -> None:
    pipe.send([new_request_id() for _ in range(3)])


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_request_id()
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(target=_child, args=(child,))
    process.start()
    theirs = parent.recv()
    process.join(10)
    ours = [new_request_id() for _ in range(3)]
    assert not set(ours) & set(theirs)
    assert {i[:16] for i in ours} != {i[:16] for i in theirs}
