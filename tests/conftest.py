"""Shared pytest fixtures."""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture
def zroot(tmp_path, monkeypatch):
    """A fresh user zoo (via LOZOO_ZOO) and an empty bundled zoo for every test."""
    root = tmp_path / "zoo"
    monkeypatch.setenv("LOZOO_ZOO", str(root))
    from zoo import store

    monkeypatch.setattr(store, "BUNDLED_ROOT", tmp_path / "bundled")
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One real, embedded Ray for the whole session's in-process Ray tests (2 CPUs, no dashboard).

    ``address="local"`` never joins a cluster left by ``ray start`` or named by RAY_ADDRESS.
    Executors see Ray already initialised and leave it running; it stops at the session's end.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        logging_level=logging.WARNING,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
