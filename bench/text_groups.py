"""Text batches padded whole against split into length groups (issue 15's cost).

    python bench/text_groups.py [--data CSV ...] [--threads 1 2] [--out FILE.json]

A text batch is padded to its longest text, so on texts of mixed lengths most of
a batch's tokens can be padding. ``autotransfer.data.batches.length_groups``
sorts a batch's rows by length and cuts it where the padding saved pays for
another forward pass (``overhead``, in padded tokens). For each CSV (``text`` and
``label`` columns; the default is the shipped ``studies/support-tickets.csv``)
this times, with the packaged all-MiniLM-L6-v2 in training mode, the forward and
backward passes of ``--batches`` random batches of 32 (the default batch size),
whole and grouped at several overheads, at each ``--threads``; and records the
padded tokens of each. The grouped passes give the whole batch's gradient
(``tests/test_length_groups.py``), so the time is the only difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from autotransfer.data.batches import forward, length_groups, make_batch
from autotransfer.data.datasets import load_text_file
from autotransfer.plugins.host import get_plugin_host
from autotransfer.spec.model import BackboneRef

ROOT = Path(__file__).resolve().parents[1]
WHOLE = 10**9  # an overhead no group pays for: the batch stays whole


def time_steps(backbone, data, batches: list[torch.Tensor], overhead: int) -> tuple[float, int]:
    """Seconds of forward + backward over ``batches`` and their padded tokens."""
    model = backbone.model.train()
    tokens = 0
    start = time.perf_counter()
    for idx in batches:
        model.zero_grad(set_to_none=True)
        for rows in length_groups(data, idx, backbone, overhead):
            x = make_batch(data, rows, backbone)
            tokens += x["input_ids"].numel()
            loss = F.cross_entropy(forward(model, x), data.labels[rows]) * len(x["input_ids"])
            loss.backward()
    return time.perf_counter() - start, tokens


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+",
                        default=[ROOT / "autotransfer" / "_studies" / "support-tickets.csv"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--overheads", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/text_groups.json")
    args = parser.parse_args()
    ref = BackboneRef(name="hf:sentence-transformers/all-MiniLM-L6-v2", weights="packaged")
    rows = []
    for path in args.data:
        data = load_text_file(path)
        backbone = get_plugin_host().build(ref, num_classes=len(data.classes), image_size=64)
        ids = data.encoded(backbone.preprocessing)
        lengths = sorted(len(i) for i in ids)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randperm(len(data), generator=g)[:32] for _ in range(args.batches)]
        for threads in args.threads:
            torch.set_num_threads(threads)
            time_steps(backbone, data, batches[:2], WHOLE)  # warm-up
            whole, whole_tokens = time_steps(backbone, data, batches, WHOLE)
            for overhead in args.overheads:
                seconds, tokens = time_steps(backbone, data, batches, overhead)
                row = {
                    "data": path.name if path.name != "data.csv" else path.parent.name,
                    "examples": len(data), "tokens_median": lengths[len(lengths) // 2],
                    "tokens_max": lengths[-1], "threads": threads, "overhead": overhead,
                    "whole_seconds": round(whole, 2), "grouped_seconds": round(seconds, 2),
                    "speedup": round(whole / seconds, 2),
                    "whole_tokens": whole_tokens, "grouped_tokens": tokens,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "batches": args.batches, "batch_size": 32, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
