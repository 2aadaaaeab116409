"""Shared pytest fixtures."""

from __future__ import annotations

import logging
import os

import pytest


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
