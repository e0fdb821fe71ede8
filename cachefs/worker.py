"""A cache worker: the same MEM/SSD tiers as a mount, serving chunks to peers.

It fetches from the backend only for the sources it was started with; every
chunk it serves comes from its tiers or from one backend fetch, whatever the
number of mounts asking for it at once (the reader's single-flight).
"""

from __future__ import annotations

import logging
import signal

import trio

from cachefs import metrics
from cachefs.config import WorkerConfig
from cachefs.reader import Reader
from cachefs.stack import (
    freeze_startup_objects,
    open_backend,
    open_tiers,
    reader_tiers,
    serve_metrics,
    serve_peers,
)

log = logging.getLogger(__name__)


async def run_worker(config: WorkerConfig) -> None:
    """Serve until SIGTERM/SIGINT.

    Raises:
        ConfigError: a source cannot be read or the address cannot be listened on.
    """
    async with trio.open_nursery() as nursery:
        await serve_metrics(config, nursery)
        mem, disk = await open_tiers(config)
        readers = {}
        names = {}
        for name, url in config.sources.items():
            backend = await open_backend(url, config)
            # No read-ahead: mounts read ahead, and their requests fan out over the ring.
            readers[backend.source] = Reader(reader_tiers(mem, disk), backend, config.chunk_size, 0, nursery)
            names[name] = backend.source
            log.info("source %s = %s", name, backend.source)
        metrics.register_source_usage([mem, disk], names)
        await serve_peers(config, config.node, config.listen, readers, nursery)
        freeze_startup_objects()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("got %s, stopping", signal.Signals(signum).name)
                break
        nursery.cancel_scope.cancel()
