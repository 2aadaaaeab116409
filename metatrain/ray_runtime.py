"""Starting or joining Ray for the Ray executor.

* Embedded (default): ``ray.init(address="local")`` starts a private Ray on this machine with
  no dashboard, a bounded object store and token auth off (it listens on this machine only and
  dies with the driver). ``"local"`` is deliberate: plain ``ray.init()`` would silently join
  whatever cluster ``ray start`` last left in ``/tmp/ray/ray_current_cluster``.
* Joined: ``--address auto|HOST:PORT`` or ``RAY_ADDRESS`` connects this driver to a running
  cluster; ``close`` then only disconnects, it never stops a cluster it did not start.
* Already initialised (a test fixture, a notebook that called ``ray.init``): used as is and
  left running.

An unreachable address would make ``ray.init`` retry for minutes, so the GCS port is probed
first and a clear error names the address and the fix.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray

OBJECT_STORE_BYTES = 256 * 1024**2  # θ is ~1-10 KB and worker states a few MB: plenty
PROBE_TIMEOUT_S = 5.0

log = logging.getLogger("lozoo.metatrain.ray")


@dataclass
class RayRuntime:
    """How this process is attached to Ray, so ``close`` undoes exactly that."""

    owned: bool  # this process called ray.init (and so calls ray.shutdown)
    embedded: bool  # a private local Ray, started here
    address: str | None  # the cluster joined, if any

    def close(self) -> None:
        if self.owned and ray.is_initialized():
            ray.shutdown()  # stops an embedded Ray; only disconnects from a joined cluster


def requested_address(address: str | None) -> str | None:
    """``--address`` else ``RAY_ADDRESS``; ``None`` means an embedded Ray (``local`` forces it)."""
    chosen = address or os.environ.get("RAY_ADDRESS") or None
    return None if chosen in (None, "local") else chosen


def connect(address: str | None, num_cpus: int) -> RayRuntime:
    """Attach to Ray per ``address`` (see the module doc); ``num_cpus`` sizes an embedded Ray."""
    if ray.is_initialized():
        return RayRuntime(owned=False, embedded=False, address=None)
    target = requested_address(address)
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if target is None:
        # A private, machine-local instance: Ray >= 2.5x enables token auth for new local
        # clusters unless told otherwise; the user's explicit RAY_AUTH_MODE still wins.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            **quiet,
        )
        return RayRuntime(owned=True, embedded=True, address=None)
    gcs = _reachable_gcs(target)
    try:
        ray.init(address=gcs, **quiet)
    except (ConnectionError, RuntimeError) as err:
        raise ValueError(
            f"joining the Ray cluster at {target} ({gcs}) failed: {err}. Driver and cluster need "
            "the same Ray and Python versions (compare `ray --version` on both)"
        ) from None
    log.info("joined the Ray cluster at %s", gcs)
    return RayRuntime(owned=True, embedded=False, address=gcs)


def _reachable_gcs(target: str) -> str:
    """``target`` resolved to the cluster's HOST:PORT, after checking something listens there."""
    if target.startswith("ray://"):
        return target  # Ray Client: ray.init reports its own connection errors
    hint = (
        "start one with `ray start --head --port=6379` (and `ray start --address=HEAD:6379` on "
        "the other machines), or drop --address and unset RAY_ADDRESS to use an embedded Ray"
    )
    gcs = target
    if target == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            gcs = canonicalize_bootstrap_address("auto")
        except Exception as err:  # several clusters found, or Ray moved this private helper
            raise ValueError(f"--address auto: cannot pick a Ray cluster ({err}); {hint}") from None
        if not gcs:
            raise ValueError(f"--address auto: no running Ray cluster on this machine; {hint}")
    host, _, port = gcs.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot reach a Ray cluster at {target} ({gcs}: {err}); is `ray start --head` "
            f"running there (check `ray status --address={gcs}`)? Otherwise {hint}"
        ) from None
    return gcs
