"""Build a mount's layers and run it until unmounted or signalled."""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

import pyfuse3
import trio

from cachefs import control
from cachefs.config import NodeConfig
from cachefs.errors import ConfigError
from cachefs.fuse_ops import Operations
from cachefs.node import Node
from cachefs.stack import client_node_name, freeze_startup_objects

log = logging.getLogger(__name__)


def _set_kernel_read_ahead(real_mountpoint: str, kb: int) -> None:
    """Raise the FUSE bdi's read_ahead_kb so buffered sequential reads arrive as 1 MiB
    requests. Found through mountinfo: a stat() of our own mountpoint (or a realpath()
    through it) would wait on this very process and deadlock."""
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real_mountpoint and " - fuse" in line:
                dev = fields[2]  # the last match is the newest mount on that path: ours
    try:
        if dev is None:
            raise OSError("not in /proc/self/mountinfo")
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.warning("cannot raise read-ahead of %s: %s", real_mountpoint, e)


async def run_mount(
    config: NodeConfig,
    on_ready: Callable[[], None] = lambda: None,
    extra: Callable[[Node, Operations, trio.Nursery], None] | None = None,
) -> None:
    """Mount the node's datasets at `config.mountpoint` and serve until unmounted.

    `extra(node, ops, nursery)`, if given, is called once mounted, before the first
    request is answered; it may start tasks in `nursery`, which lives as long as the
    mount (`cachefs fluid-mount` starts its config watch there).

    Raises:
        ConfigError: a source or the mountpoint cannot be used; nothing is mounted then.
    """
    name = f"{config.serve[0]}:{config.serve[1]}" if config.serve else client_node_name()
    socket = control.socket_path(config.run_dir, config.mountpoint)
    async with Node(config, config.datasets, name=name, serve=config.serve, control_socket=socket) as node:
        ops = Operations(
            node,
            entry_ttl=config.entry_ttl,
            attr_ttl=config.attr_ttl,
            block_size=min(config.chunk_size, 1 << 20),
        )
        root = config.root_dataset
        fsname = root.source if root is not None else "+".join(d.name for d in config.datasets)
        options = set(pyfuse3.default_options)
        # A comma would end the option: libfuse splits -o on them.
        # Not "ro": a read-write dataset may be added while mounted; read-only ones
        # answer every change with EROFS themselves.
        options |= {"noatime", f"fsname=cachefs:{fsname.replace(',', '%2C')}", "subtype=cachefs"}
        if os.getuid() == 0:
            options.add("allow_other")  # jobs run as other users than the daemon
        real_mountpoint = os.path.realpath(config.mountpoint)
        try:
            pyfuse3.init(ops, config.mountpoint, options)
        except RuntimeError as e:
            raise ConfigError(f"mountpoint {config.mountpoint}: cannot mount ({e})") from None

        async def when_serving() -> None:
            # The kernel holds every request until our INIT reply is processed, and
            # that reply resets the bdi's read-ahead; so a stat() that returns means
            # the mount answers and the read-ahead can now be set for good.
            await trio.to_thread.run_sync(os.stat, real_mountpoint)
            _set_kernel_read_ahead(real_mountpoint, config.kernel_read_ahead_kb)
            freeze_startup_objects()
            log.info("mounted %s at %s", fsname, config.mountpoint)
            node.ready = True  # /readyz
            on_ready()

        # The kernel's entries can be dropped now.
        node.on_removed = ops.dataset_removed
        node.on_changed = ops.backend_changed
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_terminate_on_signals)
                if extra is not None:
                    extra(node, ops, nursery)
                nursery.start_soon(when_serving)
                await pyfuse3.main(min_tasks=4, max_tasks=config.fuse_tasks)
                nursery.cancel_scope.cancel()
        finally:
            node.unhook()
            # Unmount even after a crash: a dead mount would hang every job that touches it.
            pyfuse3.close(unmount=True)
    log.info("unmounted %s", config.mountpoint)


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got %s, unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
