"""A cache worker: the same MEM/SSD tiers as a mount, serving chunks to peers.

It fetches from the backend only for the sources it was started with; every
chunk it serves comes from its tiers or from one backend fetch, whatever the
number of mounts asking for it at once (the reader's single-flight).
"""

from __future__ import annotations

import logging
import os
import signal

import trio

from cachefs import control
from cachefs.config import WorkerConfig
from cachefs.node import Node
from cachefs.stack import freeze_startup_objects

log = logging.getLogger(__name__)


async def run_worker(config: WorkerConfig) -> None:
    """Serve until SIGTERM/SIGINT.

    Raises:
        ConfigError: a source cannot be read or the address cannot be listened on.
    """
    socket = control.socket_path(os.path.join(config.cache_dir, "run"), config.node)
    async with Node(config, config.datasets(), name=config.node, serve=config.listen, control_socket=socket):
        freeze_startup_objects()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("got %s, stopping", signal.Signals(signum).name)
                break
