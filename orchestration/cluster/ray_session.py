"""The one way hanyeong starts or joins Ray: a local Ray bound to 127.0.0.1, or a cluster's address.

Data preparation and the pipeline runner both submit through it, so a run holds one Ray session.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager


@contextmanager
def ray_session(num_cpus: int | None = None, address: str | None = None, resources: dict | None = None):
    """The Ray already initialized, the cluster at `address`, or a local Ray bound to 127.0.0.1
    with `num_cpus` CPUs, `resources` declared, no dashboard and workers at normal priority; a Ray
    started here is shut down afterwards."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield sys.modules["ray"]
        return
    if address is None:
        # Ray resolves the node address to the host's outward IP unless this switch is off; it is read
        # when ray is imported, so it is also flipped on ray's constants if ray was imported already.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    if address is None:
        ray_constants.ENABLE_RAY_CLUSTER = False
        # Ray >= 2.59 turns token auth on for a new local cluster by itself (the token is
        # ~/.ray/auth_token, made if missing; RAY_AUTH_MODE=disabled opts out) and logs a warning
        # saying so on every start: kept on, and quiet.
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = notice.level
        notice.setLevel(logging.ERROR)
        try:
            ray.init(
                num_cpus=num_cpus,
                resources=resources or None,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                logging_level=logging.WARNING,
                # Ray runs workers at nice 15 by default; this Ray exists for this command's own
                # work, so its tasks run at the command's priority (on a busy machine nice 15 loses ~25%).
                _system_config={"worker_niceness": 0},
            )
        finally:
            notice.setLevel(level)
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
