"""`leadrouter bench` end to end on a small load: it reports what it promises, runs the
reference pipeline when asked, and leaves no database, exchange or queue behind."""

import json
import re
import statistics
from dataclasses import asdict
from typing import Any

import aio_pika
import aiormq.exceptions
import asyncpg
import pytest
from rich.console import Console

from tests.helpers import queue_consumers
from worker.settings import Settings
from worker.tools import bench


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The settings of every run the bench makes (each its own database and names)."""
    runs: list[Settings] = []
    real = bench.bench_settings

    def recording(*args: Any) -> Settings:
        runs.append(real(*args))
        return runs[-1]

    monkeypatch.setattr(bench, "bench_settings", recording)
    return runs


async def _left_behind(runs: list[Settings]) -> list[str]:
    left = []
    for run in runs:
        try:
            conn = await asyncpg.connect(run.database_url)
        except asyncpg.InvalidCatalogNameError:
            pass
        else:
            await conn.close()
            left.append(run.database_url)
        for queue in (run.inbound_queue, run.dead_queue):
            if await queue_consumers(run.amqp_url, queue) is not None:
                left.append(queue)
        async with await aio_pika.connect(run.amqp_url) as connection:
            for exchange in (run.inbound_exchange, run.events_exchange, run.dead_exchange):
                try:  # a channel each: a failed passive declaration closes it
                    await (await connection.channel()).declare_exchange(exchange, passive=True)
                    left.append(exchange)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    pass
    return left


async def test_throughput_against_the_reference(settings: Settings, made: list[Settings]) -> None:
    result = await bench.run_bench(settings, 300, 3, 1, None, Console(quiet=True), reference=True)
    assert result.mode == "throughput" and result.messages == 300
    assert result.messages_per_second > 0 and result.cpu_seconds_per_1000 > 0
    assert result.peak_rss_mb > 0
    assert result.reference is not None and result.reference["messages_per_second"] > 0
    assert result.ratio_to_reference is not None and result.ratio_to_reference > 0
    assert len(made) == 2  # the reference's run, then leadrouter's
    assert json.loads(json.dumps(asdict(result)))["workers"] == 1  # `bench --json`: a number
    assert await _left_behind(made) == []


async def test_paced_latency_in_process(settings: Settings, made: list[Settings]) -> None:
    result = await bench.run_bench(settings, 100, 2, 0, 200, Console(quiet=True))
    assert result.workers == 0 and result.mode == "paced 200/s"
    out = Console(record=True, width=120)
    bench.render(result, out)
    assert re.search(r"^workers +0 \(in-process\)$", out.export_text(), re.MULTILINE)
    assert result.latency_p50_ms is not None and result.latency_p99_ms is not None
    assert 0 < result.latency_p50_ms <= result.latency_p99_ms
    assert result.reference is None and result.ratio_to_reference is None
    assert await _left_behind(made) == []


async def test_team_size_weights_every_source_as_asked(
    settings: Settings, made: list[Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    weighted: list[int] = []
    real = bench.admin.set_weights

    async def recording(pool: asyncpg.Pool, key: str, weights: dict[int, int]) -> int:
        weighted.append(len(weights))
        return await real(pool, key, weights)

    monkeypatch.setattr(bench.admin, "set_weights", recording)
    result = await bench.run_bench(
        settings, 200, 2, 0, None, Console(quiet=True), operators=30, weights_per_source=30
    )
    assert result.messages == 200 and result.messages_per_second > 0
    assert (result.operators, result.weights_per_source) == (30, 30)
    assert weighted == [30, 30]
    assert await _left_behind(made) == []


@pytest.mark.parametrize("strategy", ["weighted_random", "least_loaded"])
async def test_strategy_sets_every_sources(
    settings: Settings, made: list[Settings], monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    added: list[str | None] = []
    real = bench.admin.add_source

    async def recording(pool: asyncpg.Pool, key: str, *args: Any, **kwargs: Any) -> Any:
        added.append(args[2])
        return await real(pool, key, *args, **kwargs)

    monkeypatch.setattr(bench.admin, "add_source", recording)
    result = await bench.run_bench(
        settings, 200, 2, 0, None, Console(quiet=True), operators=30, strategy=strategy
    )
    assert result.messages == 200 and result.strategy == strategy
    assert added == [strategy, strategy]
    assert await _left_behind(made) == []


async def test_schedules_measures_with_and_without(
    settings: Settings, made: list[Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--schedules: two runs on the same load, the second with every operator on a shift
    and with leave set (all still take work), compared."""
    from worker import availability

    set_shifts: list[int] = []
    real = availability.set_shift

    async def counting(pool: Any, operator_id: int, *args: Any) -> Any:
        set_shifts.append(operator_id)
        return await real(pool, operator_id, *args)

    monkeypatch.setattr(availability, "set_shift", counting)
    result = await bench.run_bench(
        settings, 300, 3, 1, None, Console(quiet=True), operators=12, schedules=True
    )
    assert result.schedules and len(made) == 2
    assert len(set_shifts) == 12  # the second run's team only
    assert result.no_schedules is not None and result.no_schedules["messages_per_second"] > 0
    assert result.ratio_to_no_schedules is not None and result.ratio_to_no_schedules > 0
    assert await _left_behind(made) == []


async def test_history_measures_off_then_on(
    settings: Settings, made: list[Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--history: two runs on the same load, contacts' history off then on, compared."""
    from worker import history

    configured: list[bool] = []
    real = history.configure

    def recording(on: bool) -> None:
        configured.append(on)
        real(on)

    monkeypatch.setattr(history, "configure", recording)
    result = await bench.run_bench(
        settings.model_copy(update={"history": False}),
        200,
        2,
        0,  # in-process: the worker's own setting is seen here
        None,
        Console(quiet=True),
        history=True,
    )
    assert [run.history for run in made] == [False, True]
    assert configured == [False, True]
    assert result.history_off is not None and result.history_off["messages_per_second"] > 0
    assert result.ratio_to_history_off is not None and result.ratio_to_history_off > 0
    assert await _left_behind(made) == []


async def test_rounds_alternate_the_order_and_average_the_ratios(
    settings: Settings, made: list[Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--rounds 2 with --reference and --history: the reference, history off, history on,
    then the other way round; each ratio the geometric mean of the rounds'."""
    runs: list[tuple[str, bool]] = []
    real = bench._measure

    async def recording(base: Settings, *args: Any, **kwargs: Any) -> bench.Result:
        runs.append((args[6], base.history))  # the pipeline, and history on or off
        return await real(base, *args, **kwargs)

    monkeypatch.setattr(bench, "_measure", recording)
    result = await bench.run_bench(
        settings.model_copy(update={"history": False}),
        200,
        2,
        0,
        None,
        Console(quiet=True),
        reference=True,
        history=True,
        rounds=2,
    )
    first = [("reference", True), ("leadrouter", False), ("leadrouter", True)]
    assert runs == first + first[::-1]
    assert result.round_ratios is not None
    for name in ("ratio_to_reference", "ratio_to_history_off"):
        rounds = result.round_ratios[name]
        assert len(rounds) == 2 and all(r > 0 for r in rounds)
        assert getattr(result, name) == round(statistics.geometric_mean(rounds), 3)
    assert await _left_behind(made) == []
