"""Four workers on one study: their memory with the shared decoded-data file
against each decoding its own copy, and the decode time paid once.

    python bench/shared_data.py DATA_DIR [--workers 4] [--size 128] [--code DIR]
        [--stagger] [--seconds 60] [--out FILE]

Creates a study on ``DATA_DIR`` (e.g. ``bench/shapes.py OUT --per-class 3334
--size 128``: 20,004 images) with a tiny model (``timm:test_resnet@none``, 1
epoch, batch 32), then starts ``--workers`` ``autotransfer worker`` processes on
it and, once each has started a trial, sums their memory from
``/proc/PID/smaps_rollup`` every 5 s for ``--seconds``: PSS (proportional set
size: a page shared by k processes counts 1/k in each, so the sum is the memory
the workers take together) and RSS (each process's resident pages, shared ones
counted in every process). Then stops the workers (SIGTERM).

``--code DIR``: run the workers from another checkout (e.g. ``git archive`` of
the commit before the shared file, for today's per-worker copies).
``--stagger``: start each worker once the previous one has its data (keeps the
peak of several processes decoding at once off a small machine). Writes JSON
with the machine's CPU count, memory and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_File", "Pss_Anon", "Shared_Clean"):
                out[key] = int(rest.split()[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--code", type=Path, default=None)
    parser.add_argument("--stagger", action="store_true")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--label", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = str(args.code.resolve())
    work = Path(tempfile.mkdtemp(prefix="shared-data-bench-"))
    spec = {
        "name": "shared-data-bench",
        "data": {"path": str(args.data.resolve()), "image_size": args.size,
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "search": {"backbones": ["timm:test_resnet@none"], "batch_size": 32},
        "train": {"epochs": 1, "threads": 1, "feature_cache": False},
        "n_trials": 1000,
    }
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    storage = f"sqlite:///{work / 'study.db'}"
    artifacts = work / "artifacts"
    subprocess.run(
        [sys.executable, "-c",
         "import sys; from pathlib import Path;"
         "from autotransfer.spec.model import load_spec;"
         "from autotransfer.store.studies import create_or_resume;"
         "create_or_resume(load_spec(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))",
         str(work / "spec.yaml"), storage, str(artifacts)],
        check=True, env=env, cwd=work,
    )
    load = [os.getloadavg()[0]]
    cmd = [sys.executable, "-m", "autotransfer", "worker", "--storage", storage,
           "--study-name", "shared-data-bench"]
    procs: list[subprocess.Popen] = []
    logs = []
    start = time.perf_counter()
    started_trial: dict[int, float] = {}

    def poll() -> None:
        for i, log in enumerate(logs):
            if i not in started_trial and "trial " in log.read_text(errors="replace"):
                started_trial[i] = time.perf_counter() - start

    for i in range(args.workers):
        log = work / f"worker{i}.log"
        logs.append(log)
        # cwd: ``python -m`` puts it first on sys.path, before PYTHONPATH (--code)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                      stderr=log.open("w"), env=env, cwd=work))
        while args.stagger and i not in started_trial:
            poll()
            assert procs[-1].poll() is None, log.read_text()
            time.sleep(1)
    try:
        while len(started_trial) < args.workers:
            poll()
            for p, log in zip(procs, logs, strict=True):
                assert p.poll() is None, log.read_text()
            time.sleep(1)
        all_started = time.perf_counter() - start
        samples = []
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            per = [memory_kib(p.pid) for p in procs]
            samples.append({k: sum(m.get(k, 0) for m in per) for k in per[0]}
                           | {"per_worker_pss": [m["Pss"] for m in per]})
            load.append(os.getloadavg()[0])
            time.sleep(5)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    decoded = sorted((artifacts / "decoded").glob("*/meta.json"))
    meta = json.loads(decoded[0].read_text()) if decoded else None
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    result = {
        "label": args.label or ("per-worker copies" if args.code else "shared file"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "mem_total_gib": round(os.sysconf("SC_PHYS_PAGES")
                                           * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
                    "load_1min": {"min": min(load), "max": max(load),
                                  "mean": round(sum(load) / len(load), 2)}},
        "data": str(args.data), "images": meta["count"] if meta else None,
        "image_size": args.size, "workers": args.workers, "stagger": args.stagger,
        "decoded_bytes": (meta["count"] * 3 * args.size ** 2) if meta else None,
        "decode_seconds_once": meta["decode_seconds"] if meta else None,
        "decoded_by": meta["decoded_by"] if meta else None,
        "seconds_until_each_worker_started_a_trial": sorted(
            round(v, 1) for v in started_trial.values()),
        "seconds_until_all_started": round(all_started, 1),
        "sum_pss_mib": {"max": mib(max(s["Pss"] for s in samples)),
                        "mean": mib(sum(s["Pss"] for s in samples) / len(samples))},
        "sum_rss_mib": {"max": mib(max(s["Rss"] for s in samples)),
                        "mean": mib(sum(s["Rss"] for s in samples) / len(samples))},
        "sum_pss_file_mib_max": mib(max(s.get("Pss_File", 0) for s in samples)),
        "sum_pss_anon_mib_max": mib(max(s.get("Pss_Anon", 0) for s in samples)),
        "samples": len(samples),
        "last_sample": samples[-1],
    }
    name = "shared" if not args.code else "copies"
    out = args.out or Path(f"bench/results/shared_data-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
