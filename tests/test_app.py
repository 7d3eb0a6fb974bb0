"""After startup the app moves what it holds out of the cyclic collector's way."""

from __future__ import annotations

import gc

import pytest

from taskapp.app import create_app
from tests.conftest import running


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


async def test_startup_freezes_and_raises_the_threshold(make_settings, restore_gc):
    gc.unfreeze()
    async with running(create_app(make_settings(gc_freeze=True))) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert gc.get_freeze_count() > 10_000  # the framework, the app, their clients
        assert gc.get_threshold() == (10_000, 50, 100)


async def test_gc_freeze_false_leaves_the_collector_alone(make_settings, restore_gc):
    gc.unfreeze()
    before = gc.get_threshold()
    async with running(create_app(make_settings())) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == before
