"""Turn the raw numbers of a run into the Markdown table, the targets of issue 5, and files.

    python -m bench.report bench/results/RUN.json     # render a saved run again

Every cell is the median of the repeats. The two ratio columns divide the
cachefs MEM number by JuiceFS (shm cache) and by the pyfuse3 ceiling; for
times (ms) they divide the other way, so above 1.0 always means cachefs is
better.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
COLD, WARM, DROPPED = STATES = ("cold", "warm", "warm-dropped")
# The pairs compared with JuiceFS CE: the same tier in the same state.
JUICEFS_PAIRS = (("cachefs", "juicefs", "MEM vs JuiceFS shm"), ("cachefs-ssd", "juicefs-disk", "SSD vs JuiceFS disk"))


class Table:
    """Medians of a run's records, looked up by (system, state, workload)."""

    def __init__(self, data: dict):
        self.data = data
        groups: dict[tuple[str, str, str], list[dict]] = {}
        for rec in data["runs"]:
            groups.setdefault((rec["system"], rec["state"], rec["workload"]), []).append(rec)
        self.groups = groups

    def median(self, system: str, state: str, workload: str, field: str = "value") -> float | None:
        values = [r[field] for r in self.groups.get((system, state, workload), []) if field in r]
        return statistics.median(values) if values else None

    def max(self, system: str, field: str) -> float | None:
        values = [r[field] for (s, _, _), recs in self.groups.items() if s == system for r in recs if field in r]
        return max(values) if values else None

    def rows(self) -> list[tuple[str, str]]:
        """(workload, state) pairs that have at least one number, in workload then state order."""
        out = []
        for workload in self.data["workloads"]:
            for state in STATES:
                if any(s == state and w == workload for (_, s, w) in self.groups):
                    out.append((workload, state))
        return out

    def ratio(self, a: str, b: str, state: str, workload: str) -> float | None:
        """a over b as a speed-up (>1: a is better), or None if either is missing."""
        x, y = self.median(a, state, workload), self.median(b, state, workload)
        if not x or not y:
            return None
        return y / x if self.data["workloads"][workload]["unit"] == "ms" else x / y


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ms":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def fmt_cores(cores: float | None) -> str:
    """The daemon's CPU cores during a cell, as a suffix to the cell's figure."""
    return "" if cores is None else f" · {cores:.2f}c"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def machine_lines(m: dict) -> list[str]:
    """The Machine and cachefs lines of a report header, from host.machine()."""
    return [
        f"- **Machine**: {m['cores']} cores ({m['cpu']}), {m['memory_bytes'] / GiB:.1f} GiB RAM, "
        f"kernel {m['kernel']}, Python {m['python']}, work dir on {m['workdir_disk']}",
        f"- **cachefs**: {m['cachefs']}, git {m['cachefs_git']}; pyfuse3 {m['pyfuse3']}, {m['libfuse']}, "
        f"fuse max_pages_limit {m['fuse_max_pages_limit']}",
    ]


def experiment_lines(data: dict) -> list[str]:
    """The header lines of an experiment's report (bench.metadata, bench.warmup): the machine, the
    run's duration and load, and warnings when the code changed mid-run or the run did not finish."""
    m = data["machine"]
    run = (f"- **Run**: took {data.get('duration_s', 0) / 60:.1f} min; load average at start "
           f"{m.get('loadavg_at_start', [0.0])[0]:.2f}")
    if "write_s" in data:
        run += f"; dataset written in {data['write_s']:.0f} s"
    lines = [*machine_lines(m), run]
    if data.get("cachefs_digest_end"):
        lines += ["", "**cachefs's code changed during the run**: the numbers may mix two versions."]
    if data.get("partial"):
        lines += ["", "**This run did not finish: the numbers are partial.**"]
    return lines


def error_lines(errors: list[str]) -> list[str]:
    """The "## Errors" section of a bench module's report: each error's first line; none without errors."""
    if not errors:
        return []
    return ["", "## Errors", ""] + [f"- `{e.splitlines()[0][:300]}`" for e in errors]


def random_method(data: dict) -> str:
    """How the random jobs ran, and which of their figures stands."""
    ramp, runtime = data.get("ramp_s", 0), data["runtime_s"]
    text = f"random jobs timed for {runtime:g} s"
    if ramp:
        text += f" after a {ramp:g} s ramp (fio ramp_time; the daemon's CPU is counted from the same moment)"
    if data.get("random_repeat", data["repeat"]) != data["repeat"]:
        text += f", {data['random_repeat']} repeat(s) of each"
    if any(r.get("state") == COLD and "runtime_s" in r for r in data["runs"]):
        cold = min(r["runtime_s"] for r in data["runs"] if r.get("state") == COLD and "runtime_s" in r)
        text += f" (cold ones {cold:g} s with no ramp: longer would time a filled cache)"
    if runtime >= 20:
        text += "; these steady-state figures stand over the 3 s ones of earlier runs"
    else:
        text += "; shorter than 20 s, so not steady state: the 20 s figures stand"
    return text


def _header(data: dict) -> list[str]:
    m, d = data["machine"], data["dataset"]
    raw = data.get("raw_s3", {}).get("mib_s")
    lines = [
        f"# cachefs benchmark {data['started']} on {m['hostname']}",
        "",
        *machine_lines(m),
        f"- **Others**: {m['juicefs']}; {m['rclone']}; {m['fio']}",
        f"- **Dataset**: big.bin {d['big_size'] / MiB:.0f} MiB, {d['small_count']} × 64 KiB, "
        f"{d['ttfb_count']} × 8 MiB (TTFB: opened in reverse listing order, out of reach of directory read-ahead), random bytes, written through S3 to a local JuiceFS volume "
        f"served by `juicefs gateway` on 127.0.0.1",
        f"- **Method**: median of {data['repeat']} repeat(s); {random_method(data)}; "
        f"fio psync; small files read by 4 threads; the run took {data.get('duration_s', 0) / 60:.1f} min; "
        f"load average at start {m.get('loadavg_at_start', [0.0])[0]:.2f}",
        "- **Raw S3**: ranged 4 MiB GETs with s3fs, 8 streams, page cache dropped: "
        + (f"**{raw:.0f} MiB/s**" if raw else "not measured"),
    ]
    other = sorted(r["other_cpu_cores"] for r in data["runs"] if "other_cpu_cores" in r)
    if other:
        lines.append(f"- **Other work on the machine** while cells ran (CPU busy outside the reader and the "
                     f"daemon, in cores of {m['cores']}): median {statistics.median(other):.2f}, "
                     f"90th percentile {other[int(0.9 * (len(other) - 1))]:.2f}. Systems are interleaved per "
                     f"workload, so it falls on all of them alike; above ~0.3 the cells are noisy.")
    changed = {s.get("cachefs_digest_end") for s in data["systems"].values()} - {None}
    if changed:
        lines += ["", f"**cachefs's code changed during the run** (digest {m.get('cachefs_digest')} at the start, "
                  f"{', '.join(sorted(changed))} at the end): its cells may mix two versions."]
    if data.get("partial"):
        lines += ["", "**This run did not finish: the numbers are partial.**"]
    return lines


def main_table(data: dict, t: Table) -> list[str]:
    systems = [k for k, s in data["systems"].items() if not s.get("skip_reason")]
    labels = [data["systems"][k]["label"] for k in systems]
    lines = [
        "| workload | state | " + " | ".join(labels) + " | cachefs ÷ JuiceFS | cachefs ÷ ceiling |",
        "|---|---|" + "---:|" * (len(systems) + 2),
    ]
    for workload, state in t.rows():
        w = data["workloads"][workload]
        cells = [fmt(t.median(s, state, workload), w["unit"]) + fmt_cores(t.median(s, state, workload, "daemon_cpu_cores"))
                 for s in systems]
        lines.append(
            f"| {w['label']} ({w['unit']}) | {state} | " + " | ".join(cells)
            + f" | {fmt_ratio(t.ratio('cachefs', 'juicefs', state, workload))}"
            + f" | {fmt_ratio(t.ratio('cachefs', 'ceiling', state, workload))} |"
        )
    return lines


def cost_table(data: dict, t: Table) -> list[str]:
    """Daemon CPU per GiB read for every FUSE system, and cachefs's RSS and backend GETs."""
    fuse = [k for k, s in data["systems"].items() if not s.get("skip_reason") and k != "tmpfs"]
    if not fuse:
        return ["(no FUSE system measured)"]
    cachefs = [k for k in fuse if k.startswith("cachefs")]
    head = [f"CPU s/GiB · cores {data['systems'][k]['label']}" for k in fuse]
    head += [f"{data['systems'][k]['label']} {x}" for k in cachefs for x in ("peak RSS MiB", "GETs")]
    lines = ["| workload | state | " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(head)]
    for workload, state in t.rows():
        if data["workloads"][workload]["unit"] == "ms" or state == "warm":
            continue  # TTFB reads 1 byte; warm reads mostly never reach the daemon
        cells = [fmt(t.median(k, state, workload, "cpu_s_per_gib"), "")
                 + fmt_cores(t.median(k, state, workload, "daemon_cpu_cores")) for k in fuse]
        for k in cachefs:
            rss = t.median(k, state, workload, "peak_rss_bytes")
            cells.append(fmt(rss / MiB if rss else None, ""))
            gets = t.median(k, state, workload, "delta_gets")
            cells.append("—" if gets is None else f"{gets:,.0f}")
        lines.append(f"| {data['workloads'][workload]['label']} | {state} | " + " | ".join(cells) + " |")
    return lines


def targets(data: dict, t: Table) -> list[tuple[str, str, str]]:
    """(target, verdict, the numbers) for each target of issue 5 the run can judge."""
    out = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "**MISSED**")

    for system, floor, tier in (("cachefs", 0.9, "MEM"), ("cachefs-ssd", 0.8, "SSD")):
        r = t.ratio(system, "ceiling", "warm-dropped", "seq-1m-1j")
        nums = (f"{fmt(t.median(system, 'warm-dropped', 'seq-1m-1j'), '')} vs "
                f"{fmt(t.median('ceiling', 'warm-dropped', 'seq-1m-1j'), '')} MiB/s = {fmt_ratio(r)}")
        out.append((f"warm {tier}, page cache dropped, seq 1M ≥ {floor} × pyfuse3 ceiling",
                    verdict(None if r is None else r >= floor), nums))

    def juicefs_target(title: str, floor: float, keep) -> None:
        checked, missed = 0, []
        for a, b, tier in JUICEFS_PAIRS:
            for workload, state in t.rows():
                r = t.ratio(a, b, state, workload) if keep(workload) else None
                if r is None:
                    continue
                checked += 1
                if r < floor:
                    missed.append((r, f"{data['workloads'][workload]['label']} {state} {tier.split()[0]} {r:.2f}×"))
        if not checked:
            out.append((title, verdict(None), ""))
            return
        missed.sort()
        nums = f"{checked - len(missed)} of {checked} cells"
        if missed:
            nums += "; worst: " + ", ".join(text for _, text in missed[:6])
            nums += f" and {len(missed) - 6} more" if len(missed) > 6 else ""
        out.append((title, verdict(not missed), nums))

    juicefs_target("≥ 1.0 × JuiceFS CE on every workload (same tier, same state)", 1.0, lambda w: True)
    juicefs_target("≥ 1.5 × JuiceFS CE on sequential reads", 1.5, lambda w: w.startswith("seq"))
    juicefs_target("small files ≥ 1.0 × JuiceFS CE (files/s)", 1.0, lambda w: w == "small-files")

    raw = data.get("raw_s3", {}).get("mib_s")
    cold = t.median("cachefs", "cold", "seq-1m-1j")
    cold4 = t.median("cachefs", "cold", "seq-1m-4j")
    out.append(("cold seq 1M ≥ 0.9 × raw S3 (s3fs, 8 streams)",
                verdict(None if not (raw and cold) else cold >= 0.9 * raw),
                f"×1 {fmt(cold, '')} MiB/s, ×4 {fmt(cold4, '')} MiB/s vs raw {fmt(raw, '')} MiB/s"
                + (f" = {cold / raw:.2f}×" if raw and cold else "")))

    peer = data["systems"].get("cachefs-peer", {})
    r = t.ratio("cachefs-peer", "cachefs", "warm-dropped", "seq-1m-1j")
    if r is None:
        nums = peer.get("skip_reason") or ("cachefs-peer not run" if not peer else "no seq 1M warm-dropped cell "
                                           "for both cachefs-peer and cachefs")
    else:
        gets = t.median("cachefs-peer", "warm-dropped", "seq-1m-1j", "delta_gets")
        nums = (f"{fmt(t.median('cachefs-peer', 'warm-dropped', 'seq-1m-1j'), '')} vs "
                f"{fmt(t.median('cachefs', 'warm-dropped', 'seq-1m-1j'), '')} MiB/s = {fmt_ratio(r)} "
                f"(seq 1M, page cache dropped); the peer mount's backend GETs: "
                + ("—" if gets is None else f"{gets:,.0f}"))
    out.append(("peer hit ≥ 0.7 × local MEM hit (seq 1M, warm-dropped)", verdict(None if r is None else r >= 0.7),
                nums))

    for system, info in data["systems"].items():
        if "mem_size_bytes" not in info or info.get("skip_reason"):
            continue
        mem = info["mem_size_bytes"]
        peak = t.max(system, "peak_rss_bytes")
        limit = mem + 150 * MiB
        out.append((f"{data['systems'][system]['label']}: daemon RSS ≤ --mem-size + 150 MiB under every workload",
                    verdict(None if peak is None else peak <= limit),
                    f"peak {fmt(peak / MiB if peak else None, '')} MiB vs limit {limit / MiB:.0f} MiB"))
    return out


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**MISSED**")


def issue14_targets(data: dict, t: Table) -> list[tuple[str, str, str]]:
    """(target, verdict, the numbers) for each target of issue 14 this run can judge
    (peer hits and epochs larger than the cache have their own benches: bench.peer_hits, bench.epochs)."""
    out = []
    label = lambda w: data["workloads"][w]["label"]  # noqa: E731

    def value(system: str, state: str, workload: str) -> str:
        unit = data["workloads"].get(workload, {}).get("unit", "")  # a workload not run: "—"
        return fmt(t.median(system, state, workload), unit) + fmt_cores(t.median(system, state, workload,
                                                                                  "daemon_cpu_cores"))

    r = t.ratio("cachefs", "ceiling", DROPPED, "rand-4k-direct")
    out.append(("MEM, small O_DIRECT (rand 4k ×4 direct, warm-dropped) ≥ 0.9 × pyfuse3 ceiling",
                _verdict(None if r is None else r >= 0.9),
                f"{value('cachefs', DROPPED, 'rand-4k-direct')} vs {value('ceiling', DROPPED, 'rand-4k-direct')} "
                f"IOPS = {fmt_ratio(r)}"))

    checked, missed, nums = 0, 0, []
    for workload in ("rand-4k-direct", "rand-128k-direct"):
        r = t.ratio("cachefs", "juicefs", DROPPED, workload)
        room = t.ratio("ceiling", "juicefs", DROPPED, workload)
        if r is None:
            continue
        if room is not None and room < 1.0:
            nums.append(f"{label(workload)} {fmt_ratio(r)} (ceiling {fmt_ratio(room)} JuiceFS: out of reach)")
            continue
        checked += 1
        missed += r < 1.0
        nums.append(f"{label(workload)} {fmt_ratio(r)}")
    out.append(("MEM ≥ 1.0 × JuiceFS shm on O_DIRECT random reads, where the ceiling allows (warm-dropped)",
                _verdict(not missed) if checked else ("out of reach" if nums else _verdict(None)),
                "; ".join(nums)))

    cells, missed_cells = [], []
    for workload in ("seq-1m-1j", "seq-1m-4j", "rand-4k", "rand-128k", "rand-4k-direct", "rand-128k-direct"):
        r = t.ratio("cachefs-ssd", "juicefs-disk", DROPPED, workload)
        if r is None:
            continue
        cpu = t.median("cachefs-ssd", DROPPED, workload, "cpu_s_per_gib")
        text = f"{label(workload)} {fmt_ratio(r)}" + (f" ({cpu:.2f} s/GiB)" if cpu is not None else "")
        cells.append(text)
        if r < 0.9:
            missed_cells.append(text)
    out.append(("SSD hits (MEM off, warm-dropped) ≥ 0.9 × JuiceFS disk cache, sequential and random; "
                "cachefs CPU per GiB", _verdict(None if not cells else not missed_cells), "; ".join(cells)))

    raw = data.get("raw_s3", {}).get("mib_s")
    cold = t.median("cachefs", COLD, "seq-1m-1j")
    cpu = t.median("cachefs", COLD, "seq-1m-1j", "cpu_s_per_gib")
    ok = None if not (raw and cold and cpu is not None) else cold >= 0.9 * raw and cpu <= 1.0
    out.append(("cold seq 1M ≥ 0.9 × raw S3 (8 streams) and the mount's CPU ≤ 1.0 s/GiB", _verdict(ok),
                f"{fmt(cold, '')} vs {fmt(raw, '')} MiB/s" + (f" = {cold / raw:.2f}×" if raw and cold else "")
                + f", {fmt(cpu, '')} s/GiB"))

    files = t.median("cachefs", COLD, "small-files")
    others = {k: t.median(k, COLD, "small-files") for k in ("rclone", "s3fs") if k in data["systems"]}
    others = {k: v for k, v in others.items() if v}
    best = max(others.values()) if others else None
    out.append(("small files, cold ≥ 1.0 × the better of rclone and s3fs-fuse", _verdict(
        None if not (files and best) else files >= best),
        f"{fmt(files, '')} files/s vs " + (", ".join(f"{k} {fmt(v, '')}" for k, v in others.items()) or "—")
        + (f" = {files / best:.2f}×" if files and best else "")))

    ttfb, rclone = t.median("cachefs", COLD, "ttfb"), t.median("rclone", COLD, "ttfb")
    out.append(("TTFB, cold ≤ 1.0 × rclone's", _verdict(None if not (ttfb and rclone) else ttfb <= rclone),
                f"{fmt(ttfb, 'ms')} vs {fmt(rclone, 'ms')} ms"))
    return out


def render(data: dict) -> str:
    t = Table(data)
    lines = _header(data)
    lines += ["", "## Results", "",
              "Cold: the system's cache wiped, fresh mount, page cache dropped. Warm: after an untimed pass "
              "over the dataset, page cache kept. Warm-dropped: page cache dropped before each workload (the "
              "daemon serves the hit). *direct* = O_DIRECT, one FUSE request per read. Ratios: above 1.0 "
              "means cachefs MEM is better (for ms: the other's time ÷ cachefs's). After each figure: "
              "the daemon's CPU cores (its CPU seconds ÷ the cell's wall seconds; 2 cores in all).", ""]
    lines += main_table(data, t)
    lines += ["", "## Targets (issue 5)", "", "| target | verdict | numbers |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(data, t)]
    lines += ["", "## Targets (issue 14)", "", "| target | verdict | numbers |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in issue14_targets(data, t)]
    lines += ["", "## Daemon cost", "",
              "CPU s/GiB: utime+stime of the daemon's processes during the workload ÷ GiB the workload read; "
              "cores: the same CPU seconds ÷ the workload's wall seconds. "
              "Peak RSS: VmHWM, reset before each workload. GETs: cachefs's backend GET requests.", ""]
    lines += cost_table(data, t)
    notes = []
    for key, s in data["systems"].items():
        if s.get("skip_reason"):
            notes.append(f"- {s['label']}: not measured: {s['skip_reason']}.")
            continue
        bits = []
        if s.get("note"):
            bits.append(s["note"])
        if s.get("read_ahead_kb") is not None:
            bits.append(f"bdi read_ahead_kb {s['read_ahead_kb']}")
        if s.get("warm_up"):
            bits.append("warm-up pass " + ", ".join(f"{p['mib_s']:.0f} MiB/s" for p in s["warm_up"]))
        if s.get("error"):
            bits.append(f"**stopped early**: {s['error'].splitlines()[0]}")
        notes.append(f"- {s['label']}: " + "; ".join(bits) + ".")
    lines += ["", "## Notes", ""] + notes
    if data["errors"]:
        lines += ["", "## Errors", ""]
        lines += [f"- {e['system']} {e['state']} {e['workload']}: `{e['error'].splitlines()[0][:300]}`"
                  for e in data["errors"]]
    return "\n".join(lines) + "\n"


def write(data: dict, directory: Path, name: str, partial: bool = False) -> dict[str, Path]:
    """Write NAME.json (every record) and NAME.md (the rendered report) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    data["partial"] = partial
    paths = {"json": directory / f"{name}.json", "markdown": directory / f"{name}.md"}
    paths["json"].write_text(json.dumps(data, indent=1, default=str) + "\n")
    paths["markdown"].write_text(render(data))
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.report RUN.json")
    print(render(json.loads(Path(sys.argv[1]).read_text())))
