"""The machine: what it is, its page cache, its mount table and its processes;
and a benchmark run's scratch directories, torn down whatever happens.

Everything here reads /proc and /sys directly. A stat() of a mount point is
avoided on purpose: it never returns when the FUSE daemon behind it hangs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30


def parse_size(text: str) -> int:
    """'2G', '256M', '64K' or plain bytes (binary units)."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def script_module(name: str):
    """scripts/NAME.py (scripts/ is not a package), loaded once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def juicefs_backend():
    """scripts/juicefs_backend.py: the embedded S3 gateway and JuiceFS mounts."""
    return script_module("juicefs_backend")


_jb = juicefs_backend()
# The same helpers serve the gateway and JuiceFS mounts in scripts/juicefs_backend.py.
free_port = _jb.free_port  # a TCP port on 127.0.0.1 that was free a moment ago
is_mounted = _jb._mounted  # reads /proc/self/mountinfo, never stats the (maybe hung) mount point


def require_root() -> None:
    """The bench mounts filesystems and drops the page cache: both need root."""
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it mounts filesystems and drops the page cache)")
    if not os.path.exists("/dev/fuse"):
        raise SystemExit("bench: /dev/fuse is missing")


def drop_page_cache() -> None:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`: the next read comes from the daemon, not the kernel."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def prefault_memory(gib: float) -> float:
    """Write ``gib`` GiB of memory once, then free it, so the pages are backed when the caller needs them.

    This VM backs guest memory lazily and reports freed pages back to its host
    within seconds (free page reporting); the first write to such a page costs
    ~5x a later one (3 s/GiB against 0.6 s/GiB here). Freed just before a timed
    workload, these pages are what the kernel hands out next.

    Returns:
        Seconds spent.
    """
    t0 = time.monotonic()
    blocks = []
    try:
        for _ in range(max(1, round(gib * 16))):
            blocks.append(b"\1" * (64 * MiB))  # malloc + memset: every page written
    finally:
        del blocks
    return time.monotonic() - t0


# -- mount table ------------------------------------------------------------------


def _unescape(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t")
            .replace("\\012", "\n").replace("\\134", "\\"))


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, major:minor, fstype) of every line of /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(" ")
            fstype = line.split(" - ", 1)[1].split(" ")[0] if " - " in line else ""
            out.append((_unescape(fields[4]), fields[2], fstype))
    return out


def mount_device(path: str | os.PathLike) -> str | None:
    """major:minor of the newest mount at ``path`` (its bdi name), or None."""
    target = os.path.realpath(path)
    found = None
    for mp, dev, _ in mounts():
        if mp == target:
            found = dev
    return found


def read_ahead_kb(path: str | os.PathLike) -> int | None:
    """The bdi read_ahead_kb of the mount at ``path`` (None if unknown)."""
    dev = mount_device(path)
    try:
        return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())
    except (OSError, ValueError, TypeError):
        return None


def set_read_ahead_kb(path: str | os.PathLike, kb: int) -> None:
    dev = mount_device(path)
    if dev is None:
        raise OSError(f"{path} is not mounted")
    Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(str(kb))


def lazy_unmount(path: str | os.PathLike) -> None:
    """Detach ``path`` now, even if busy or its daemon is gone. No error if not mounted."""
    for cmd in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        try:
            subprocess.run([*cmd, str(path)], capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            pass


def unmount(path: str | os.PathLike, timeout: float = 20.0) -> None:
    """Unmount cleanly if possible, else lazily; returns once ``path`` left the mount table."""
    for cmd in (["fusermount3", "-u"], ["umount"]):
        if not is_mounted(path):
            return
        try:
            subprocess.run([*cmd, str(path)], capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            break
    lazy_unmount(path)


def mounts_under(root: str | os.PathLike) -> list[str]:
    """Mount points at or below ``root``, deepest first (the order to unmount them)."""
    root = os.path.realpath(root)
    found = [mp for mp, _, _ in mounts() if mp == root or mp.startswith(root + "/")]
    return sorted(set(found), key=len, reverse=True)


def wait_for(predicate, timeout: float, what: str, alive=lambda: True, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true. Raises RuntimeError after ``timeout`` or once ``alive()`` is false."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if not alive():
            raise RuntimeError(f"{what}: the process exited first")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done within {timeout:g} s")
        time.sleep(interval)


# -- processes ---------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2:].split()


def busy_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK, steal / _CLK_TCK


def own_cpu_seconds() -> float:
    """CPU of this process and of its reaped children (fio)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid``: a daemon started with start_new_session=True and its children."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            # fields[0] is field 3 (state); the session id is field 6.
            if fields is not None and int(fields[3]) == sid:
                pids.append(int(entry))
    return pids


def cpu_seconds(sid: int) -> float:
    """utime + stime of the live processes of session ``sid`` (all their threads)."""
    total = 0
    for pid in session_pids(sid):
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return total / _CLK_TCK


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (every CPU, every process and the
    kernel's own threads; not idle or waiting for I/O), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLK_TCK


def wait_idle(sids: list[int], timeout: float = 60.0, window: float = 0.5, share: float = 0.05) -> float:
    """Wait until the processes of sessions ``sids`` together use less than ``share``
    of a CPU over ``window`` seconds (or ``timeout`` passed). Returns the seconds waited
    beyond the one window every call takes (0 if they were idle at once).

    A benchmark cell starts on quiet servers: work deferred by the cell before (JuiceFS
    deleting a removed file's blocks in the background) must not run into it, where it
    would be counted against whichever system happens to run next."""
    t0 = time.monotonic()
    while True:
        c0 = sum(cpu_seconds(sid) for sid in sids)
        time.sleep(window)
        if sum(cpu_seconds(sid) for sid in sids) - c0 < share * window or time.monotonic() - t0 >= timeout:
            return time.monotonic() - t0 - window


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_bytes(sid: int) -> int:
    """The largest VmHWM (peak resident set) among the processes of session ``sid``."""
    return max((_status_kib(pid, "VmHWM") for pid in session_pids(sid)), default=0) * 1024


def reset_peak_rss(sid: int) -> None:
    """Reset VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`), to measure one workload's peak."""
    for pid in session_pids(sid):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def stop_session(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL what is left after ``timeout``, reap it."""
    _jb.stop_process(proc, timeout)


# The environment daemons start in, and log tails for errors: shared with the tests.
hermetic_env = _jb.hermetic_env
tail = _jb.tail


# -- what the machine is ---------------------------------------------------------


def cachefs_digest() -> str:
    """A short hash of cachefs's code as mounts would load it (sources and the built extension).

    Taken per system: when the tree changes during a run (an edit, a rebuild), the
    report says which systems ran on which code.
    """
    h = hashlib.sha256()
    for pattern in ("cachefs/**/*.py", "cachefs/*.so", "native/*.pyx", "native/*.pxd"):
        for path in sorted(REPO.glob(pattern)):
            h.update(str(path.relative_to(REPO)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:10]


def git_head(tree: str) -> str:
    """The short commit a checkout is at (an A/B run's baseline, for the report)."""
    res = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() or "unknown (not a git checkout)"


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr).strip() else "?"


def _meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def machine(workdir: str | os.PathLike) -> dict:
    """Cores, memory, kernel, CPU, disk of ``workdir`` and the versions of everything measured."""
    cpu_model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    disk = "?"
    res = subprocess.run(["df", "--output=source,fstype", str(workdir)], capture_output=True, text=True)
    if res.returncode == 0 and len(res.stdout.splitlines()) > 1:
        disk = " ".join(res.stdout.splitlines()[1].split())
    venv_bin = Path(sys.executable).parent
    git = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "cachefs", "native"],
                           capture_output=True, text=True).stdout.strip()
    try:
        import pyfuse3
        pyfuse3_version = pyfuse3.__version__
    except Exception as exc:  # noqa: BLE001 - only informational
        pyfuse3_version = f"not importable ({exc})"
    try:
        max_pages = Path("/proc/sys/fs/fuse/max_pages_limit").read_text().strip()
    except OSError:
        max_pages = "?"
    return {
        "hostname": socket.gethostname(),
        "cores": os.cpu_count(),
        "cpu": cpu_model,
        "memory_bytes": _meminfo_bytes("MemTotal"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cachefs": _run([sys.executable, "-m", "cachefs", "--version"]),
        "cachefs_git": git + ("-dirty" if dirty else ""),
        "pyfuse3": pyfuse3_version,
        "libfuse": _run(["fusermount3", "--version"]),
        "fuse_max_pages_limit": max_pages,
        "fio": _run(["fio", "--version"]),
        "juicefs": _run([str(venv_bin / "juicefs") if (venv_bin / "juicefs").exists() else "juicefs", "version"]),
        "rclone": _run(["rclone", "version"]) if shutil.which("rclone") else "not installed",
        "workdir_disk": disk,
    }


# -- a run's scratch space and teardown ------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def unwind_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so a run's teardown runs; a signal
    the caller chose to ignore (nohup, `cmd &` in a script) stays ignored."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_interrupt)


@contextlib.contextmanager
def scratch_dirs(
    parent: str | os.PathLike, prefix: str, keep: bool, save_logs_to: Callable[[], Path | None]
) -> Iterator[tuple[Path, Path, contextlib.ExitStack]]:
    """A work directory under `parent` and one on /dev/shm, and an ExitStack for
    what the run starts in them.

    On the way out, also after a failure or Ctrl-C: the stack's callbacks last to
    first (the run's daemons), then leftover mounts under the work directory are
    lazily unmounted, then the logs are copied if `save_logs_to()` names a place,
    and both directories are removed (the work directory not if `keep`).
    """
    Path(parent).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent)).resolve()
    shm = Path(tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")).resolve()
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(_remove_dirs, work, shm, keep, save_logs_to)
            stack.callback(_unmount_leftovers, work)
            yield work, shm, stack
    finally:
        for mp in mounts_under(work):
            log(f"WARNING: still mounted: {mp}")


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A bench module's parser: the first paragraph of its docstring `doc` as the
    description, the rest as the epilog, line breaks kept."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc.split("\n\n", 1)[1])


def exit_code(finished: bool | None) -> int:
    """A bench run's exit status from `run_experiment`'s answer: 130 interrupted, 0 finished, 1 failed."""
    if finished is None:
        return 130
    return 0 if finished else 1


def run_experiment(
    kind: str,
    args,
    data: dict,
    run: Callable[..., None],
    render: Callable[[dict], str],
    has_results: Callable[[dict], bool],
) -> bool | None:
    """The shell every experiment of bench/ (scale, metadata) runs in: root, signals,
    scratch directories, `run(args, data, work, shm, stack)`, and the results written
    as `<stamp>-<host>-<kind>.md` and `.json` under `args.results` (under tmp/ if the
    run did not finish), also after a failure or Ctrl-C, when `has_results(data)`.

    Returns:
        True if the run finished, False if it failed, None if it was interrupted.
    """
    require_root()
    unwind_on_signals()
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    data.update(started=started.isoformat(timespec="seconds"), errors=[])
    finished = False
    try:
        with scratch_dirs(args.workdir, f"cachefs-{kind}.", False,
                          lambda: Path(args.results) / "tmp" / f"{stamp}-{kind}-logs" if data["errors"] else None
                          ) as (work, shm, stack):
            try:
                run(args, data, work, shm, stack)
            except Exception as exc:
                data["errors"].append(f"{type(exc).__name__}: {exc}")
                raise
        finished = True
    except KeyboardInterrupt:
        log("interrupted; everything started has been unmounted and stopped")
        return None
    finally:
        data["duration_s"] = time.monotonic() - t0
        if has_results(data):
            directory = Path(args.results) / ("" if finished else "tmp")
            directory.mkdir(parents=True, exist_ok=True)
            data["partial"] = not finished
            name = f"{stamp}-{data['machine']['hostname']}-{kind}"
            (directory / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
            (directory / f"{name}.md").write_text(render(data))
            print()
            print(render(data))
            log(f"wrote {directory / name}.md and .json")
    return finished


def _unmount_leftovers(work: Path) -> None:
    for mp in mounts_under(work):
        log(f"lazy-unmounting leftover {mp}")
        lazy_unmount(mp)


def _remove_dirs(work: Path, shm: Path, keep: bool, save_logs_to: Callable[[], Path | None]) -> None:
    dest = save_logs_to()
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        for log_file in [*work.glob("logs/*.log"), work / "backend" / "gateway.log"]:
            if log_file.is_file():
                shutil.copy(log_file, dest / log_file.name)
        log(f"something failed: logs copied to {dest}")
    shutil.rmtree(shm, ignore_errors=True)
    if keep:
        log(f"kept the work directory {work}")
        return
    if mounts_under(work):
        log(f"not removing {work}: something is still mounted under it")
        return
    shutil.rmtree(work, ignore_errors=True)
