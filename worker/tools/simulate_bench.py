"""How long `simulate` takes on a large recorded period: a scratch database (named after
LEADROUTER_DATABASE_URL's, with `_simbench` added; dropped afterwards) gets a team, three
sources (one per strategy) and N recorded contacts over the last week (SQL
`seed_simulation_contacts`), then `simulate` replays them through a routing file that
changes the weights, timed.

    python -m worker.tools.simulate_bench [--contacts 100000] [--operators 30] [--repeat 3]
                                          [--json]
"""

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from worker import routing_file, simulate
from worker.migrate import drop_database, migrate
from worker.settings import Settings
from worker.sql import Q

STRATEGIES = ("smooth", "least_loaded", "weighted_random")
WEEK = 7 * 24 * 3600


@dataclass
class Result:
    contacts: int
    replayed: int
    operators: int
    seed_seconds: float
    simulate_seconds: list[float]  # each run: reading, replaying, comparing, as the command
    simulate_cpu_seconds: list[float]  # this process's CPU in each (PostgreSQL's not in it)
    simulated_queued: int
    actual_queued: int


def routing_text(operators: int, max_load: int, shift: int = 0) -> str:
    """A team of `operators` and one source per strategy, each weighted on ten of them
    (weights 1-3; `shift` moves which weight goes to whom)."""
    lines = []
    for n in range(operators):
        lines += ["[[operators]]", f'name = "op{n}"', f"max_load = {max_load}"]
    for i, strategy in enumerate(STRATEGIES):
        team = [f"op{(i * 10 + k) % operators}" for k in range(10)]
        weights = ", ".join(f"{name} = {1 + (k + shift) % 3}" for k, name in enumerate(team))
        lines += ["[[sources]]", f'key = "{strategy}"', f'strategy = "{strategy}"']
        lines += [f"weights = {{ {weights} }}"]
    return "\n".join(lines) + "\n"


async def run(settings: Settings, contacts: int, operators: int, repeat: int = 3) -> Result:
    parts = urlsplit(settings.database_url)
    url = urlunsplit(parts._replace(path=f"/{parts.path.lstrip('/') or 'leadrouter'}_simbench"))
    await drop_database(url)
    await migrate(url, settings.migrations_dir)
    try:
        async with asyncpg.create_pool(url, min_size=1, max_size=2) as pool:
            live = routing_file.parse(routing_text(operators, 10), "toml")
            await routing_file.apply(pool, live, dry_run=False)
            ids = [r["id"] for r in await pool.fetch(Q.list_sources)]
            began = time.perf_counter()
            await pool.execute(
                Q.seed_simulation_contacts, contacts, float(WEEK), ids, max(contacts // 5, 1)
            )
            await pool.execute("ANALYZE")
            seeded = time.perf_counter() - began
            what_if = routing_file.parse(routing_text(operators, 12, shift=1), "toml")
            now = datetime.now(UTC)
            period = simulate.Period(now - timedelta(seconds=WEEK + 60), now)
            took, cpu = [], []
            for _ in range(repeat):
                began, used = time.perf_counter(), time.process_time()
                outcome = await simulate.run(pool, what_if, period)
                took.append(round(time.perf_counter() - began, 2))
                cpu.append(round(time.process_time() - used, 2))
    finally:
        await drop_database(url)
    return Result(
        contacts,
        outcome.contacts,
        operators,
        round(seeded, 2),
        took,
        cpu,
        outcome.simulated.queued,
        outcome.actual.queued,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--operators", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3, help="simulate runs on the same data")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(Settings(), args.contacts, args.operators, max(args.repeat, 1)))
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        for key, value in asdict(result).items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
