"""The benchmark's pure number handling: percentiles, drain rates, tables, JSON and target checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.answer import STAGES, AnswerSample, stage_samples
from bench.report import (
    PhaseResult,
    Target,
    evaluate_targets,
    format_table,
    latency_summary,
    load_results,
    percentile,
    render_report,
    windowed_rate,
    write_json,
)


def phase(**overrides: object) -> PhaseResult:
    values: dict[str, object] = {
        "scenario": "comparison",
        "system": "wxphone",
        "mode": "drain",
        "processes": 2,
        "concurrency": 100,
        "submitted": 100,
        "distinct_codes": 100,
        "succeeded": 100,
        "phone_calls": 100,
        "token_fetches": 1,
        "jobs_per_second": 400.0,
        "max_rss_mb": 120.0,
    }
    values.update(overrides)
    return PhaseResult(**values)  # type: ignore[arg-type]


class TestPercentile:
    def test_interpolates_like_numpy(self) -> None:
        values = [1.0, 2.0, 3.0, 4.0]
        assert percentile(values, 0) == 1.0
        assert percentile(values, 100) == 4.0
        assert percentile(values, 50) == pytest.approx(2.5)
        assert percentile(values, 95) == pytest.approx(3.85)

    def test_order_of_input_does_not_matter(self) -> None:
        assert percentile([9.0, 1.0, 5.0], 50) == 5.0

    def test_single_value(self) -> None:
        assert percentile([7.0], 99) == 7.0

    def test_rejects_empty_input_and_bad_quantiles(self) -> None:
        with pytest.raises(ValueError):
            percentile([], 50)
        with pytest.raises(ValueError):
            percentile([1.0], 101)

    def test_summary_of_nothing_is_all_none(self) -> None:
        assert latency_summary([]) == {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}

    def test_summary(self) -> None:
        summary = latency_summary([float(v) for v in range(1, 101)])
        assert summary["p50"] == pytest.approx(50.5)
        assert summary["p99"] == pytest.approx(99.01)
        assert summary["max"] == 100.0
        assert summary["mean"] == pytest.approx(50.5)


class TestWindowedRate:
    def test_steady_rate_is_recovered(self) -> None:
        times = [index / 50 for index in range(1000)]  # 50 events per second
        assert windowed_rate(times) == pytest.approx(50.0)

    def test_slow_start_and_tail_are_left_out(self) -> None:
        steady = [10 + index / 100 for index in range(1000)]
        times = [0.0, 5.0, *steady, 60.0, 90.0]
        assert windowed_rate(times) == pytest.approx(100.0, rel=0.01)

    def test_too_few_events_or_no_time(self) -> None:
        assert windowed_rate([1.0, 2.0]) is None
        assert windowed_rate([5.0] * 20) is None


class TestTables:
    def test_columns_align_and_none_is_a_dash(self) -> None:
        table = format_table(["system", "jobs/s"], [["raw", 512.3], ["wxphone", None]])
        lines = table.splitlines()
        assert lines[0].split() == ["system", "jobs/s"]
        assert lines[2].split() == ["raw", "512"]
        assert lines[3].split() == ["wxphone", "-"]
        assert len({len(line) for line in lines[:3]}) == 1

    def test_small_numbers_keep_two_decimals(self) -> None:
        assert "1.00" in format_table(["a", "b"], [["x", 1.0]])

    def test_report_merges_drain_and_paced_rows_of_the_comparison(self) -> None:
        drain = phase(submitted=100, failed=1)
        paced = phase(mode="paced", submitted=50, offered_rate=200.0, latency_ms={"p50": 60.0, "p99": 90.0})
        text = render_report([drain, paced], [], {"latency_ms": 50, "pool": "threads"})
        row = [line for line in text.splitlines() if line.startswith("wxphone ")][-1]
        cells = row.split()
        assert cells[:2] == ["wxphone", "400"]  # throughput from the drain
        assert cells[2:6] == ["60.0", "-", "90.0", "200"]  # latency and offered rate from the paced phase
        assert cells[-5:-3] == ["1", "0"]  # failed and lost of both phases

    def test_header_names_the_pool_and_what_it_runs_jobs_on(self) -> None:
        meta = {"latency_ms": 50, "processes": 2, "concurrency": 100}
        threads = render_report([], [], {**meta, "pool": "threads"}).splitlines()[0]
        gevent = render_report([], [], {**meta, "pool": "gevent"}).splitlines()[0]
        assert threads.endswith("pool threads, 2 worker process(es) x 100 threads")
        assert gevent.endswith("pool gevent, 2 worker process(es) x 100 greenlets")


class TestResultDicts:
    def test_derived_fields_are_in_the_json(self) -> None:
        data = phase(
            submitted=110, distinct_codes=100, phone_calls=100, phone_errcodes={"40001": 3}
        ).as_dict()
        assert data["phone_calls_per_job"] == pytest.approx(100 / 110)
        assert data["phone_calls_per_distinct_code"] == 1.0
        assert data["errors_40001"] == 3
        assert data["token_errors"] == 3

    def test_write_json(self, tmp_path: Path) -> None:
        target = tmp_path / "results" / "latest.json"
        write_json(target, {"results": [phase().as_dict()]})
        assert json.loads(target.read_text())["results"][0]["system"] == "wxphone"

    def test_results_read_back_as_written(self, tmp_path: Path) -> None:
        target = tmp_path / "latest.json"
        original = phase(phone_errcodes={"40029": 2}, latency_ms={"p99": 120.0})
        checks = evaluate_targets([original])
        write_json(
            target,
            {
                "meta": {"pool": "threads"},
                "results": [original.as_dict()],
                "targets": [t.as_dict() for t in checks],
            },
        )
        results, targets, meta = load_results(target)
        assert results == [original]
        assert targets == checks
        assert meta == {"pool": "threads"}


class TestTargets:
    def by_name(self, targets: list[Target], fragment: str) -> Target:
        return next(target for target in targets if fragment in target.name)

    def test_throughput_ratio(self) -> None:
        raw = phase(system="raw", jobs_per_second=500.0)
        targets = evaluate_targets([raw, phase(jobs_per_second=360.0)])
        assert self.by_name(targets, "throughput").met is True
        targets = evaluate_targets([raw, phase(jobs_per_second=300.0)])
        assert self.by_name(targets, "throughput").met is False

    def test_calls_per_code_must_be_exactly_one(self) -> None:
        ok = evaluate_targets([phase(submitted=110, distinct_codes=100, phone_calls=100)])
        assert self.by_name(ok, "per distinct code").met is True
        twice = evaluate_targets([phase(distinct_codes=100, phone_calls=101)])
        assert self.by_name(twice, "per distinct code").met is False

    def test_zero_failures_where_the_baseline_fails(self) -> None:
        base = phase(
            scenario="rotation", system="baseline", mode="paced", failed=12, phone_errcodes={"40001": 30}
        )
        good = phase(scenario="rotation", mode="paced", elapsed_seconds=60.0, token_fetches=3)
        bad = phase(scenario="rotation", mode="paced", elapsed_seconds=60.0, failed=1)
        assert self.by_name(evaluate_targets([base, good]), "(rotation)").met is True
        assert self.by_name(evaluate_targets([base, bad]), "(rotation)").met is False

    def test_token_fetches_per_lifetime_in_the_rotation_run(self) -> None:
        rotation = phase(scenario="rotation", mode="paced", elapsed_seconds=60.0, token_fetches=3)
        targets = evaluate_targets([rotation], rotation_lifetime_seconds=20.0)
        assert self.by_name(targets, "rotation run").met is True
        # Covering 3 lifetimes from a cold start needs a fourth fetch just before the end.
        assert "at least 4 fetches" in self.by_name(targets, "rotation run").detail
        busy = phase(scenario="rotation", mode="paced", elapsed_seconds=60.0, token_fetches=7)
        targets = evaluate_targets([busy], rotation_lifetime_seconds=20.0)
        assert self.by_name(targets, "rotation run").met is False

    def test_latency_and_memory(self) -> None:
        paced = phase(mode="paced", offered_rate=200.0, latency_ms={"p99": 650.0}, max_rss_mb=310.0)
        targets = evaluate_targets([paced])
        assert self.by_name(targets, "p99").met is False
        assert self.by_name(targets, "RSS").met is False

    def test_throughput_not_measured(self) -> None:
        assert self.by_name(evaluate_targets([]), "throughput").met is None


def answer_phase(p50: float, p99: float = 90.0, **overrides: object) -> PhaseResult:
    values: dict[str, object] = {
        "mode": "answer",
        "offered_rate": 150.0,
        "exchange_latency_ms": 50.0,
        "waiters": "asyncio",
        "answered": 1200,
        "answer_ms": {"p50": p50, "p95": 80.0, "p99": p99, "max": 120.0, "mean": p50},
        "answer_stages_ms": {
            stage: {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0, "mean": 1.0} for stage in STAGES
        },
        "most_waiting": 14,
        "peak_fraction": 0.5,
        "steal_cores": 0.3,
        "caller_cpu_ms_per_job": 1.5,
        "notify_probe_ms": {"p50": 0.8, "p95": 1.5, "p99": 2.5, "max": 3.0, "mean": 0.9},
    }
    values.update(overrides)
    return phase(**values)


class TestSubmitToAnswer:
    """The caller's submit-to-answer figure against the exchange latency (the 20 ms target)."""

    def by_name(self, targets: list[Target], fragment: str) -> Target:
        return next(target for target in targets if fragment in target.name)

    def test_p50_within_the_margin_of_the_exchange_latency_meets_the_target(self) -> None:
        target = self.by_name(evaluate_targets([phase(), answer_phase(p50=69.5)]), "submit-to-answer")
        assert target.met is True
        assert "p50 69.5 ms = exchange 50 ms + 19.5 ms" in target.detail
        assert "p99 90.0 ms" in target.detail

    def test_p50_beyond_the_margin_misses_it(self) -> None:
        target = self.by_name(evaluate_targets([answer_phase(p50=70.5)]), "submit-to-answer")
        assert target.met is False
        assert "+ 20.5 ms" in target.detail

    def test_the_margin_is_measured_from_the_configured_exchange_latency(self) -> None:
        slow = answer_phase(p50=215.0, exchange_latency_ms=200.0)
        assert self.by_name(evaluate_targets([slow]), "submit-to-answer").met is True

    def test_no_answer_is_not_measured_rather_than_met(self) -> None:
        empty = answer_phase(p50=0.0, answered=0, unanswered=5)
        empty.answer_ms = {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
        target = self.by_name(evaluate_targets([empty]), "submit-to-answer")
        assert target.met is None
        assert "5 unanswered" in target.detail

    def test_skipped_phase_is_reported_as_not_run(self) -> None:
        target = self.by_name(evaluate_targets([phase()]), "submit-to-answer")
        assert target.met is None
        assert not [t for t in evaluate_targets([phase(system="raw")]) if "submit-to-answer" in t.name]

    def test_report_prints_percentiles_next_to_the_exchange_latency_and_a_verdict(self) -> None:
        results = [phase(), phase(mode="paced", offered_rate=150.0), answer_phase(p50=63.25, p99=88.0)]
        text = render_report(results, evaluate_targets(results), {"latency_ms": 50, "pool": "gevent"})
        assert "Submit to answer, pool gevent: submit_phone_code, then wait for the job's end" in text
        assert "(woken by its NOTIFY), paced at 50% of wxphone's peak" in text
        row = next(line for line in text.splitlines() if line.startswith("wxphone ") and "asyncio" in line)
        # system, waiters, at jobs/s, answered, unanswered, exchange, p50, p95, p99, max, p50 - exchange,
        # most waiting, caller CPU, other cores, steal cores
        assert row.split() == ["wxphone", "asyncio", "150", "1200", "0", "50.0", "63.2", "80.0", "88.0",
                               "120", "13.2", "14", "1.50", "-", "0.30"]  # fmt: skip
        assert "PASS submit-to-answer p50 within 20 ms of the exchange latency: p50 63.2 ms" in text
        stages = text.split("Where the time goes")[1].splitlines()
        assert [line.split("  ")[0] for line in stages[3 : 3 + len(STAGES)]] == list(STAGES)
        assert stages[3 + len(STAGES)].split() == [
            "(bare",
            "NOTIFY",
            "probe)",
            "0.80",
            "1.50",
            "2.50",
            "3.00",
        ]
        # The answer phase stays out of the side-by-side table (its rows come from drain and paced).
        side_by_side = text.split("Side by side")[1].split("\n\n")[0]
        assert sum(1 for line in side_by_side.splitlines() if line.startswith("wxphone")) == 1

    def test_the_verdict_is_given_only_at_half_of_peak(self) -> None:
        at_half = answer_phase(p50=60.0, peak_fraction=0.5)
        assert self.by_name(evaluate_targets([at_half]), "submit-to-answer").met is True
        lighter = answer_phase(p50=60.0, peak_fraction=0.1, offered_rate=30.0)
        target = self.by_name(evaluate_targets([lighter]), "submit-to-answer")
        assert target.met is None
        assert target.detail.startswith("measured at 10% of peak, not at the target's 50%: p50 60.0 ms")
        assert "n/a submit-to-answer" in render_report([lighter], [], {"pool": "threads"})

    def test_a_miss_prints_fail(self) -> None:
        text = render_report([answer_phase(p50=95.0)], [], {"pool": "threads"})
        assert "FAIL submit-to-answer p50 within 20 ms" in text

    def test_answer_fields_read_back_from_json(self, tmp_path: Path) -> None:
        original = answer_phase(p50=61.0)
        write_json(tmp_path / "r.json", {"results": [original.as_dict()]})
        results, _, _ = load_results(tmp_path / "r.json")
        assert results == [original]

    def test_older_json_without_answer_fields_still_loads(self, tmp_path: Path) -> None:
        data = phase().as_dict()
        for key in ("answer_ms", "answer_stages_ms", "exchange_latency_ms", "waiters", "answered"):
            del data[key]
        write_json(tmp_path / "old.json", {"results": [data]})
        results, _, _ = load_results(tmp_path / "old.json")
        assert results[0].answer_ms == {} and results[0].exchange_latency_ms is None


class TestAnswerStages:
    """Each answer split into submit, to worker, exchange, worker other, commit + notify, read."""

    def sample(self, job_id: str, status: str = "succeeded", woken: float | None = 100.070) -> AnswerSample:
        return AnswerSample(
            job_id=job_id,
            scheduled_at=99.999,
            submit_at=100.000,
            call_started_at=100.001,
            submitted_at=100.003,
            woken_at=woken,
            answered_at=100.072,
            status=status,
        )

    def test_stages_add_up_to_the_answer(self) -> None:
        sample = self.sample("a")
        stages = stage_samples([sample], {"a": 100.005}, {"a": 100.066}, {"a": 55.0})
        assert stages["executor wait"] == [pytest.approx(1.0)]
        assert stages["submit"] == [pytest.approx(2.0)]
        assert stages["to worker"] == [pytest.approx(2.0)]
        assert stages["exchange"] == [55.0]
        assert stages["worker other"] == [pytest.approx(6.0)]
        assert stages["commit + notify"] == [pytest.approx(4.0)]
        assert stages["read"] == [pytest.approx(2.0)]
        assert sum(values[0] for values in stages.values()) == pytest.approx(sample.answer_ms)
        assert sample.lag_ms == pytest.approx(1.0)

    def test_samples_without_every_time_are_left_out(self) -> None:
        samples = [
            self.sample("failed", status="failed"),
            self.sample("unwoken", woken=None),
            self.sample("x"),
        ]
        times = {"failed": 100.005, "unwoken": 100.005}
        stages = stage_samples(samples, times, {**times, "x": 100.066}, {"failed": 50.0, "unwoken": 50.0})
        assert all(values == [] for values in stages.values())


class TestCommandLine:
    """``--pool``: every system runs on it, started through an entry point that patches for gevent first."""

    def test_answer_options(self) -> None:
        from bench.__main__ import build_parser, config_from

        parser = build_parser()
        quick = config_from(parser.parse_args(["--quick"]))
        assert (quick.answer, quick.answer_seconds, quick.answer_waiters) == (True, 8.0, "asyncio")
        assert config_from(parser.parse_args([])).answer_seconds == 20.0
        assert config_from(parser.parse_args(["--no-answer"])).answer is False
        assert config_from(parser.parse_args(["--answer-waiters", "threads"])).answer_waiters == "threads"
        assert config_from(parser.parse_args([])).answer_fraction == 0.5
        assert config_from(parser.parse_args(["--answer-fraction", "0.1"])).answer_fraction == 0.1
        with pytest.raises(SystemExit):
            parser.parse_args(["--answer-waiters", "greenlets"])

    def test_pool_choices(self) -> None:
        from bench.__main__ import build_parser, config_from

        parser = build_parser()
        assert config_from(parser.parse_args([])).pool == "threads"
        assert config_from(parser.parse_args(["--pool", "gevent"])).pool == "gevent"
        with pytest.raises(SystemExit):
            parser.parse_args(["--pool", "prefork"])

    def test_wxphone_workers_start_through_the_entry_point_that_patches_first(self) -> None:
        from bench.harness import PYTHON, SYSTEMS
        from worker.launch import wants_gevent

        args = SYSTEMS["wxphone"].worker_args(0, "gevent", 100)
        # python -m worker (the wxphone script's entry), not python -m worker.cli, which refuses gevent
        assert args[:3] == [PYTHON, "-m", "worker"]
        assert wants_gevent(args[3:], None)
        for name in ("raw", "baseline"):
            args = SYSTEMS[name].worker_args(0, "gevent", 100)
            # the celery command patches for gevent itself (maybe_patch_concurrency) before importing
            assert args[:3] == [PYTHON, "-m", "celery"]
            assert args[args.index("--pool") + 1] == "gevent"


class TestSteal:
    """CPU the hypervisor withheld, from /proc/stat's steal column, in cores over a window."""

    def test_steal_between_two_moments_interpolates_the_samples(self) -> None:
        from bench.services import ProcessSampler, Sample

        sampler = ProcessSampler(lambda: [])
        sampler.samples = [
            Sample(at=100.0, cpu_seconds=0.0, rss_mb={}, machine_steal_seconds=50.0),
            Sample(at=110.0, cpu_seconds=0.0, rss_mb={}, machine_steal_seconds=54.0),
        ]
        assert sampler.steal_between(100.0, 110.0) == pytest.approx(0.4)
        assert sampler.steal_between(102.5, 107.5) == pytest.approx(0.4)
        assert sampler.steal_between(110.0, 100.0) is None

    def test_this_machine_reports_a_steal_counter(self) -> None:
        from bench.services import machine_steal_seconds

        assert machine_steal_seconds() >= 0.0
