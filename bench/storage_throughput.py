"""Storage throughput as the engine sees it: trials/s and ask/tell latency with
1, 4 and 16 worker processes on one study, SQLite and PostgreSQL.

Each worker process opens the storage with ``autotransfer.store.storage.open_storage``
and asks through :class:`autotransfer.store.budget.BudgetedStudy` (the budget claim
under its lock, exactly as ``search`` and ``worker`` do), with a dummy objective
(one float parameter, one reported value, no training) and Optuna's random
sampler, so the numbers are the storage and the claim, not a sampler or a model.
All workers start together after their imports; the study's target is the
total, so the run ends when the budget is spent.

    python bench/storage_throughput.py                 # both storages, 1/4/16 workers
    python bench/storage_throughput.py --trials 300 --workers 1 4

PostgreSQL: ``--postgres URL`` of an empty database, or, by default, a private
throwaway server started with the test suite's helper (``tests/_postgres.py``;
needs Debian's postgresql package). Writes ``bench/results/storage_throughput.json``
and ``.md``. Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _worker(url: str, name: str, start_at: float, queue: mp.Queue) -> None:
    import optuna

    from autotransfer.store.budget import BudgetSpent
    from autotransfer.store.opening import open_for_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_for_trials(
        url, name, None, optuna.samplers.RandomSampler(), optuna.pruners.NopPruner()
    )
    asks: list[float] = []
    tells: list[float] = []
    time.sleep(max(0.0, start_at - time.time()))
    while True:
        t0 = time.perf_counter()
        try:
            trial = study.ask()
        except BudgetSpent:
            break
        t1 = time.perf_counter()
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.report(x, 1)
        t2 = time.perf_counter()
        study.tell(trial, x)
        t3 = time.perf_counter()
        asks.append(t1 - t0)
        tells.append(t3 - t2)
    queue.put({"asks": asks, "tells": tells, "end": time.time()})


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else values[0]


def run(url: str, backend: str, n_workers: int, n_trials: int) -> dict[str, object]:
    import optuna

    from autotransfer.store.records import TARGET_ATTR
    from autotransfer.store.storage import open_storage

    name = f"bench-{backend}-{n_workers}"
    study = optuna.create_study(study_name=name, storage=open_storage(url))
    study.set_user_attr(TARGET_ATTR, n_trials)
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    start_at = time.time() + 3.0 + 0.4 * n_workers  # after every worker's imports
    procs = [ctx.Process(target=_worker, args=(url, name, start_at, queue))
             for _ in range(n_workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    asks = [a for r in results for a in r["asks"]]
    tells = [t for r in results for t in r["tells"]]
    wall = max(r["end"] for r in results) - start_at
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    assert len(trials) == n_trials == len(asks), (len(trials), n_trials, len(asks))
    return {
        "storage": backend, "workers": n_workers, "trials": n_trials,
        "seconds": round(wall, 2), "trials_per_s": round(n_trials / wall, 1),
        "ask_p50_ms": round(statistics.median(asks) * 1000, 1),
        "ask_p95_ms": round(_p95(asks) * 1000, 1),
        "tell_p50_ms": round(statistics.median(tells) * 1000, 1),
        "tell_p95_ms": round(_p95(tells) * 1000, 1),
    }


def machine(pg_version: str | None) -> dict[str, object]:
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo")
                if line.startswith("MemTotal")), 0)
    import optuna
    import sqlalchemy

    return {
        "cpu_cores": os.cpu_count(), "memory_gib": round(mem / 2**20),
        "cpu": platform.processor() or platform.machine(), "gpu": "none used",
        "python": platform.python_version(), "optuna": optuna.__version__,
        "sqlalchemy": sqlalchemy.__version__, "postgresql": pg_version,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(result: dict[str, object]) -> str:
    m = result["machine"]
    lines = [
        "# Storage throughput",
        "",
        f"Machine: {m['cpu_cores']} CPU cores, {m['memory_gib']} GiB, no GPU; PostgreSQL "
        f"{m['postgresql']} on the same machine (127.0.0.1, fsync off); SQLite on local disk; "
        f"Optuna {m['optuna']}. Load average when it ended {m['load_average_at_end']} (the "
        "machine was shared). Dummy objective, random sampler, every ask through the "
        "budget claim. Made by `python bench/storage_throughput.py`.",
        "",
        "| storage | workers | trials | trials/s | ask p50 ms | ask p95 ms "
        "| tell p50 ms | tell p95 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['storage']} | {r['workers']} | {r['trials']} | {r['trials_per_s']} | "
            f"{r['ask_p50_ms']} | {r['ask_p95_ms']} | {r['tell_p50_ms']} | {r['tell_p95_ms']} |"
        )
    lines += [
        "",
        "trials/s is the whole study's. An ask includes waiting for the budget lock "
        "behind the other workers (claims are one at a time), so its latency grows with "
        "the number of workers while the study's rate stays about flat; a tell takes no "
        "lock. A real trial runs seconds to hours, so even 16 workers leave the storage "
        "idle almost all the time.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="trials per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--storages", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--postgres", help="URL of an empty PostgreSQL database")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    server = None
    runs = []
    pg_version = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for backend in args.storages:
                for n in args.workers:
                    if backend == "sqlite":
                        url = f"sqlite:///{Path(tmp) / f'bench-{n}.db'}"
                    else:
                        if args.postgres is None and server is None:
                            sys.path.insert(0, str(ROOT / "tests"))
                            from _postgres import PostgresServer, find_bin_dir

                            bin_dir = find_bin_dir()
                            if bin_dir is None:
                                sys.exit("no PostgreSQL binaries: give --postgres URL")
                            server = PostgresServer(bin_dir)
                            server.start()
                        url = args.postgres or server.create_database()
                        pg_version = pg_version or _server_version(url)
                    result = run(url, backend, n, args.trials)
                    print(json.dumps(result), flush=True)
                    runs.append(result)
        finally:
            if server is not None:
                server.cleanup()
    out = {"machine": machine(pg_version), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage_throughput.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "storage_throughput.md").write_text(markdown(out))


def _server_version(url: str) -> str:
    import sqlalchemy

    with sqlalchemy.create_engine(url).connect() as conn:
        return str(conn.execute(sqlalchemy.text("SHOW server_version")).scalar())


if __name__ == "__main__":
    main()
