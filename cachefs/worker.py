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
    """Serve until SIGTERM/SIGINT, then drain: stop accepting chunk requests, let
    those in flight finish (within `config.drain_timeout`), and return.

    Raises:
        ConfigError: a source cannot be read or the address cannot be listened on.
    """
    socket = control.socket_path(os.path.join(config.cache_dir, "run"), config.node)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Node(config, config.datasets(), name=config.node, serve=config.listen, control_socket=socket) as node:
            freeze_startup_objects()
            node.ready = True
            async for signum in signals:
                break
            name = signal.Signals(signum).name
            log.info("got %s, draining (up to %gs)", name, config.drain_timeout)
            t0 = trio.current_time()
            with trio.CancelScope() as scope:
                # A second signal stops at once.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_second_signal, signals, scope)
                    in_flight, finished = await node.drain(config.drain_timeout)
                    nursery.cancel_scope.cancel()
            elapsed = trio.current_time() - t0
            if scope.cancelled_caught:
                log.warning("got a second signal; stopping without waiting for the requests in flight")
            elif finished:
                log.info("drained %d in-flight requests in %.2fs; stopping", in_flight, elapsed)
            else:
                log.warning(
                    "drain timeout: %d in-flight requests did not finish within %gs; stopping anyway",
                    in_flight, config.drain_timeout,
                )


async def _second_signal(signals, scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("got %s while draining", signal.Signals(signum).name)
        scope.cancel()
        return
