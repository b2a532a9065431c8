"""Numbers and their presentation: percentiles, rates, the printed tables, JSON and target checks.

Everything here is pure (no servers, no clocks), so it is unit-tested directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "ANSWER_MARGIN_MS",
    "PhaseResult",
    "Target",
    "answer_verdict",
    "evaluate_targets",
    "format_table",
    "latency_summary",
    "load_results",
    "percentile",
    "render_report",
    "windowed_rate",
    "write_json",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks.

    Matches ``numpy.percentile``'s default; raises ``ValueError`` for no values.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(ordered[low])
    weight = position - low
    return float(ordered[low] * (1 - weight) + ordered[high] * weight)


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max/mean in milliseconds, or ``None`` each when there are no values."""
    if not values_ms:
        return dict.fromkeys(("p50", "p95", "p99", "max", "mean"))
    return {
        "p50": percentile(values_ms, 50),
        "p95": percentile(values_ms, 95),
        "p99": percentile(values_ms, 99),
        "max": float(max(values_ms)),
        "mean": sum(values_ms) / len(values_ms),
    }


def windowed_rate(times: Sequence[float], low: float = 0.1, high: float = 0.9) -> float | None:
    """Events per second between the ``low`` and ``high`` quantiles of their times.

    Measuring the middle of a drain leaves out worker start-up and the tail, where fewer jobs than
    pool slots remain. ``None`` when fewer than 10 events or no time passed.
    """
    if len(times) < 10:
        return None
    ordered = sorted(times)
    first = int(round((len(ordered) - 1) * low))
    last = int(round((len(ordered) - 1) * high))
    span = ordered[last] - ordered[first]
    if span <= 0:
        return None
    return (last - first) / span


@dataclass
class PhaseResult:
    """The measured figures of one workload against one system (one row of a table)."""

    scenario: str
    system: str
    mode: str  # "drain": a pre-filled queue; "paced": jobs submitted at a fixed rate
    processes: int
    concurrency: int
    submitted: int
    distinct_codes: int
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    jobs_per_second: float | None = None
    offered_rate: float | None = None
    elapsed_seconds: float | None = None
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    token_fetches: int = 0
    phone_calls: int = 0
    phone_errcodes: dict[str, int] = field(default_factory=dict)
    max_presentations_per_code: int = 0
    cpu_ms_per_job: float | None = None
    max_rss_mb: float | None = None
    failure_reasons: dict[str, int] = field(default_factory=dict)
    #: Busy cores of the whole machine during the measurement, and those outside the benchmark's
    #: own processes (PostgreSQL and anything else running on the machine).
    machine_busy_cores: float | None = None
    outside_busy_cores: float | None = None
    #: CPU the hypervisor withheld from this (virtual) machine meanwhile, in cores (/proc/stat steal).
    steal_cores: float | None = None
    notes: str = ""
    # The ``answer`` phase (wxphone): submit to answer as the caller saw it (``bench.answer``).
    #: The sandbox's configured latency of the exchange (``--latency-ms``).
    exchange_latency_ms: float | None = None
    #: ``asyncio`` (``wait_for_job_async``) or ``threads`` (``wait_for_job``).
    waiters: str = ""
    #: p50/p95/p99/max/mean of submit to answer over the submissions answered ``succeeded``.
    answer_ms: dict[str, float | None] = field(default_factory=dict)
    answered: int = 0
    #: Waits that returned anything but a succeeded job (a failure, or the job at the timeout).
    unanswered: int = 0
    #: The same summary for each stage of the answers (``bench.answer.STAGES``).
    answer_stages_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)
    #: How late submissions started against their schedule (the bench process's own lag).
    answer_lag_ms: dict[str, float | None] = field(default_factory=dict)
    #: Most submissions between submit and answer at one moment.
    most_waiting: int = 0
    #: CPU of the bench process (the callers' side) per answer during the phase.
    caller_cpu_ms_per_job: float | None = None
    #: A bare NOTIFY from another connection until the listener's callback, sampled meanwhile.
    notify_probe_ms: dict[str, float | None] = field(default_factory=dict)
    #: The offered rate as a fraction of the drain's peak (the target is defined at 0.5).
    peak_fraction: float | None = None

    @property
    def phone_calls_per_job(self) -> float | None:
        return self.phone_calls / self.submitted if self.submitted else None

    @property
    def phone_calls_per_distinct_code(self) -> float | None:
        return self.phone_calls / self.distinct_codes if self.distinct_codes else None

    @property
    def token_errors(self) -> int:
        """Business calls rejected for their token: 40001, 40014 and 42001."""
        return sum(self.phone_errcodes.get(code, 0) for code in ("40001", "40014", "42001"))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["phone_calls_per_job"] = self.phone_calls_per_job
        data["phone_calls_per_distinct_code"] = self.phone_calls_per_distinct_code
        data["errors_40001"] = self.phone_errcodes.get("40001", 0)
        data["token_errors"] = self.token_errors
        return data


# -- tables -----------------------------------------------------------------------------------

Column = tuple[str, Callable[[PhaseResult], object]]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    text_rows = [[_cell(value) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in text_rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), separator, *(line(row) for row in text_rows)])


def _latency(key: str) -> Callable[[PhaseResult], object]:
    return lambda result: result.latency_ms.get(key)


COMPARISON_COLUMNS: list[Column] = [
    ("system", lambda r: r.system),
    ("jobs/s", lambda r: r.jobs_per_second),
    ("p50 ms", _latency("p50")),
    ("p95 ms", _latency("p95")),
    ("p99 ms", _latency("p99")),
    ("at jobs/s", lambda r: r.offered_rate),
    ("token fetches", lambda r: r.token_fetches),
    ("phone calls/job", lambda r: r.phone_calls_per_job),
    ("calls/code", lambda r: r.phone_calls_per_distinct_code),
    ("40001s", lambda r: r.phone_errcodes.get("40001", 0)),
    ("failed", lambda r: r.failed),
    ("lost", lambda r: r.lost),
    ("CPU ms/job", lambda r: r.cpu_ms_per_job),
    ("RSS MB/proc", lambda r: r.max_rss_mb),
    ("other cores", lambda r: r.outside_busy_cores),
]

SCALING_COLUMNS: list[Column] = [
    ("system", lambda r: r.system),
    ("processes", lambda r: r.processes),
    ("threads/proc", lambda r: r.concurrency),
    ("jobs", lambda r: r.submitted),
    ("jobs/s", lambda r: r.jobs_per_second),
    ("token fetches", lambda r: r.token_fetches),
    ("phone calls/job", lambda r: r.phone_calls_per_job),
    ("failed", lambda r: r.failed),
    ("lost", lambda r: r.lost),
    ("CPU ms/job", lambda r: r.cpu_ms_per_job),
    ("RSS MB/proc", lambda r: r.max_rss_mb),
    ("other cores", lambda r: r.outside_busy_cores),
]


def table_of(results: Sequence[PhaseResult], columns: Sequence[Column]) -> str:
    return format_table([name for name, _ in columns], ([get(r) for _, get in columns] for r in results))


# -- targets ----------------------------------------------------------------------------------

#: The issue's target: the caller's p50 submit-to-answer at most this much above the exchange's.
ANSWER_MARGIN_MS = 20.0


@dataclass(frozen=True)
class Target:
    """One target of the issue and whether this run met it (``None``: not measured)."""

    name: str
    met: bool | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick(
    results: Sequence[PhaseResult], scenario: str, system: str, mode: str | None = None
) -> PhaseResult | None:
    for result in results:
        if result.scenario == scenario and result.system == system and (mode is None or result.mode == mode):
            return result
    return None


def answer_verdict(result: PhaseResult, margin_ms: float = ANSWER_MARGIN_MS) -> tuple[bool | None, str]:
    """Whether an ``answer`` phase met the target, and the sentence that says by how much."""
    p50 = result.answer_ms.get("p50")
    p99 = result.answer_ms.get("p99")
    exchange = result.exchange_latency_ms
    if p50 is None or exchange is None:
        return None, f"no submission was answered ({result.unanswered} unanswered)"
    above = p50 - exchange
    fraction = result.peak_fraction
    off_target_rate = fraction is not None and abs(fraction - 0.5) > 1e-9
    return (
        None if off_target_rate else above <= margin_ms,
        (f"measured at {fraction:.0%} of peak, not at the target's 50%: " if off_target_rate else "")
        + f"p50 {p50:.1f} ms = exchange {exchange:.0f} ms + {above:.1f} ms (p99 {p99 or 0:.1f} ms) at "
        f"{result.offered_rate or 0:.0f} jobs/s, {result.answered} answered, {result.unanswered} not, "
        f"{result.waiters} waiters",
    )


def evaluate_targets(
    results: Sequence[PhaseResult],
    *,
    rotation_lifetime_seconds: float | None = None,
    rss_limit_mb: float = 300.0,
    p99_limit_ms: float = 500.0,
    throughput_ratio: float = 0.7,
    answer_margin_ms: float = ANSWER_MARGIN_MS,
) -> list[Target]:
    """Check the issue's targets against the measured phases."""
    targets: list[Target] = []
    raw = _pick(results, "comparison", "raw", "drain")
    wx = _pick(results, "comparison", "wxphone", "drain")
    if raw and wx and raw.jobs_per_second and wx.jobs_per_second:
        ratio = wx.jobs_per_second / raw.jobs_per_second
        targets.append(
            Target(
                f"wxphone throughput >= {throughput_ratio:.0%} of the raw ceiling",
                ratio >= throughput_ratio,
                f"{wx.jobs_per_second:.0f} vs {raw.jobs_per_second:.0f} jobs/s = {ratio:.0%}",
            )
        )
    else:
        targets.append(
            Target(f"wxphone throughput >= {throughput_ratio:.0%} of the raw ceiling", None, "not run")
        )

    wx_all = [r for r in results if r.system == "wxphone"]
    single_lifetime = [r for r in wx_all if r.scenario != "rotation"]
    if single_lifetime:
        worst = max(r.token_fetches for r in single_lifetime)
        targets.append(
            Target(
                "token fetches <= 1 per app per token lifetime (runs shorter than one lifetime)",
                worst <= 1,
                f"at most {worst} fetch(es) in {len(single_lifetime)} wxphone runs, 1 to 4 processes",
            )
        )
    rotation = _pick(results, "rotation", "wxphone")
    if rotation and rotation_lifetime_seconds and rotation.elapsed_seconds:
        lifetimes = rotation.elapsed_seconds / rotation_lifetime_seconds
        per_lifetime = rotation.token_fetches / lifetimes
        targets.append(
            Target(
                "token fetches <= 1 per app per token lifetime (rotation run)",
                per_lifetime <= 1.0,
                f"{rotation.token_fetches} fetches over {lifetimes:.1f} lifetimes = {per_lifetime:.2f} "
                f"per lifetime; after the first fetch {(rotation.token_fetches - 1) / lifetimes:.2f} "
                "(one per refresh interval = lifetime x WXPHONE_TOKEN_REFRESH_FRACTION, whatever the "
                "number of processes). Holding a valid token from a cold start through this run "
                f"takes at least {math.floor(lifetimes) + 1} fetches",
            )
        )

    calls = [r.phone_calls_per_distinct_code for r in wx_all if r.phone_calls_per_distinct_code is not None]
    presentations = max((r.max_presentations_per_code for r in wx_all), default=0)
    if calls:
        exact = all(abs(value - 1.0) < 1e-9 for value in calls)
        targets.append(
            Target(
                "phone API calls per distinct code exactly 1",
                exact and presentations <= 1,
                f"wxphone calls/code in every run: {sorted({round(v, 4) for v in calls})}; "
                f"most presentations of one code: {presentations}",
            )
        )

    for scenario in ("duplicates", "rotation"):
        base = _pick(results, scenario, "baseline")
        mine = _pick(results, scenario, "wxphone")
        if base and mine:
            base_bad = base.token_errors + base.failed
            mine_bad = mine.token_errors + mine.failed + mine.lost
            targets.append(
                Target(
                    f"zero 40001s and zero failed jobs where the baseline shows them ({scenario})",
                    mine_bad == 0,
                    f"baseline: {base.phone_errcodes.get('40001', 0)} 40001s, {base.failed} failed; "
                    f"wxphone: {mine.phone_errcodes.get('40001', 0)} 40001s, {mine.failed} failed, "
                    f"{mine.lost} lost" + ("" if base_bad else " (the baseline showed none either)"),
                )
            )

    paced = _pick(results, "comparison", "wxphone", "paced")
    if paced and paced.latency_ms.get("p99") is not None:
        p99 = float(paced.latency_ms["p99"] or 0.0)
        targets.append(
            Target(
                f"p99 enqueue-to-commit < {p99_limit_ms:.0f} ms at half of peak throughput",
                p99 < p99_limit_ms,
                f"p99 {p99:.0f} ms at {paced.offered_rate or 0:.0f} jobs/s offered",
            )
        )

    answer = _pick(results, "comparison", "wxphone", "answer")
    answer_name = (
        f"submit-to-answer p50 within {answer_margin_ms:.0f} ms of the exchange latency at half of peak "
        "throughput"
    )
    if answer is not None:
        verdict = answer_verdict(answer, answer_margin_ms)
        targets.append(Target(answer_name, verdict[0], verdict[1]))
    elif _pick(results, "comparison", "wxphone") is not None:
        targets.append(Target(answer_name, None, "not run (--no-answer)"))

    comparison_rss = [r.max_rss_mb for r in results if r.system == "wxphone" and r.max_rss_mb is not None]
    if comparison_rss:
        worst_rss = max(comparison_rss)
        targets.append(
            Target(
                f"worker RSS < {rss_limit_mb:.0f} MB per process",
                worst_rss < rss_limit_mb,
                f"largest wxphone worker process: {worst_rss:.0f} MB",
            )
        )
    return targets


# -- output -----------------------------------------------------------------------------------


def render_report(results: Sequence[PhaseResult], targets: Sequence[Target], meta: Mapping[str, Any]) -> str:
    """The human-readable report printed at the end of a run."""
    sections: list[str] = []
    latency = meta.get("latency_ms")
    header = (
        f"wxphone benchmark: sandbox latency {latency} ms, pool {meta.get('pool')}, "
        f"{meta.get('processes')} worker process(es) x {meta.get('concurrency')} "
        f"{'greenlets' if meta.get('pool') == 'gevent' else 'threads'}"
    )
    sections.append(header)
    titles = {
        "comparison": "Side by side. jobs/s: drain of a pre-filled queue; latency: paced at half of each "
        "system's own peak",
        "duplicates": "10% duplicate submissions (paced)",
        "rotation": "Classic tokens rotating during the run (paced)",
    }
    for scenario, title in titles.items():
        # The answer phase has a section of its own.
        rows = [r for r in results if r.scenario == scenario and r.mode != "answer"]
        if not rows:
            continue
        if scenario == "comparison":
            merged = _merge_comparison(rows)
            sections.append(f"{title}\n{table_of(merged, COMPARISON_COLUMNS)}")
        else:
            sections.append(f"{title}\n{table_of(rows, COMPARISON_COLUMNS)}")
    for scenario, title in (
        ("scaling-concurrency", "Throughput vs threads per process (1 process, drain)"),
        ("scaling-processes", "Throughput vs worker processes (drain)"),
        ("backlog", "Backlog drained from a full queue: cost per job must stay flat"),
    ):
        rows = [r for r in results if r.scenario == scenario]
        if rows:
            sections.append(f"{title}\n{table_of(rows, SCALING_COLUMNS)}")
    answers = [r for r in results if r.mode == "answer"]
    if answers:
        sections.append(_answer_section(answers, meta))
    if targets:
        lines = ["Targets"]
        for target in targets:
            mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[target.met]
            lines.append(f"  {mark} {target.name}: {target.detail}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


ANSWER_COLUMNS: list[Column] = [
    ("system", lambda r: r.system),
    ("waiters", lambda r: r.waiters),
    ("at jobs/s", lambda r: r.offered_rate),
    ("answered", lambda r: r.answered),
    ("unanswered", lambda r: r.unanswered),
    ("exchange ms", lambda r: r.exchange_latency_ms),
    ("p50 ms", lambda r: r.answer_ms.get("p50")),
    ("p95 ms", lambda r: r.answer_ms.get("p95")),
    ("p99 ms", lambda r: r.answer_ms.get("p99")),
    ("max ms", lambda r: r.answer_ms.get("max")),
    (
        "p50 - exchange",
        lambda r: (
            None
            if r.answer_ms.get("p50") is None or r.exchange_latency_ms is None
            else float(r.answer_ms["p50"] or 0.0) - r.exchange_latency_ms
        ),
    ),
    ("most waiting", lambda r: r.most_waiting),
    ("caller CPU ms/job", lambda r: r.caller_cpu_ms_per_job),
    ("other cores", lambda r: r.outside_busy_cores),
    ("steal cores", lambda r: r.steal_cores),
]


def _answer_section(answers: Sequence[PhaseResult], meta: Mapping[str, Any]) -> str:
    """Submit to answer: the caller's latency, the stages it went through, and the verdict."""
    fractions = {r.peak_fraction for r in answers}
    paced = (
        f"paced at {fractions.pop():.0%} of wxphone's peak"
        if fractions and None not in fractions
        else "paced"
    )
    parts = [
        f"Submit to answer, pool {meta.get('pool')}: submit_phone_code, then wait for the job's end "
        f"(woken by its NOTIFY), {paced}, callers in the bench process\n" + table_of(answers, ANSWER_COLUMNS)
    ]
    for result in answers:
        if result.answer_stages_ms:
            rows = [
                [stage, summary.get("p50"), summary.get("p95"), summary.get("p99"), summary.get("max")]
                for stage, summary in result.answer_stages_ms.items()
            ]
            for label, summary in (
                ("(bare NOTIFY probe)", result.notify_probe_ms),
                ("(same jobs: enqueue to commit)", result.latency_ms),
                ("(submit start after schedule)", result.answer_lag_ms),
            ):
                if summary.get("p50") is not None:
                    rows.append(
                        [
                            label,
                            summary.get("p50"),
                            summary.get("p95"),
                            summary.get("p99"),
                            summary.get("max"),
                        ]
                    )
            parts.append(
                f"Where the time goes ({result.system}, {result.waiters} waiters; ms per stage, each "
                "percentile taken on its own, so they do not add up)\n"
                + format_table(["stage", "p50", "p95", "p99", "max"], rows)
            )
        met, detail = answer_verdict(result)
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[met]
        parts.append(
            f"{mark} submit-to-answer p50 within {ANSWER_MARGIN_MS:.0f} ms of the exchange latency: {detail}"
        )
    return "\n\n".join(parts)


def _merge_comparison(rows: Sequence[PhaseResult]) -> list[PhaseResult]:
    """One row per system: throughput and costs from the drain, latency from the paced phase."""
    merged: list[PhaseResult] = []
    for system in dict.fromkeys(r.system for r in rows):
        drain = next((r for r in rows if r.system == system and r.mode == "drain"), None)
        paced = next((r for r in rows if r.system == system and r.mode == "paced"), None)
        base = drain or paced
        assert base is not None
        row = PhaseResult(**{**asdict(base)})
        if paced is not None:
            row.latency_ms = paced.latency_ms
            row.offered_rate = paced.offered_rate
            row.failed = (drain.failed if drain else 0) + paced.failed
            row.lost = (drain.lost if drain else 0) + paced.lost
            row.submitted = (drain.submitted if drain else 0) + paced.submitted
            row.distinct_codes = (drain.distinct_codes if drain else 0) + paced.distinct_codes
            row.token_fetches = (drain.token_fetches if drain else 0) + paced.token_fetches
            row.phone_calls = (drain.phone_calls if drain else 0) + paced.phone_calls
            errcodes = dict(drain.phone_errcodes) if drain else {}
            for code, count in paced.phone_errcodes.items():
                errcodes[code] = errcodes.get(code, 0) + count
            row.phone_errcodes = errcodes
            rss = [value for value in (base.max_rss_mb, paced.max_rss_mb) if value is not None]
            row.max_rss_mb = max(rss) if rss else None
        merged.append(row)
    return merged


def load_results(path: Path) -> tuple[list[PhaseResult], list[Target], dict[str, Any]]:
    """Read back a JSON written by the benchmark: results, targets and meta."""
    data = json.loads(path.read_text())
    names = {item.name for item in fields(PhaseResult)}
    results = [PhaseResult(**{k: v for k, v in row.items() if k in names}) for row in data.get("results", [])]
    targets = [Target(**row) for row in data.get("targets", [])]
    return results, targets, dict(data.get("meta", {}))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
