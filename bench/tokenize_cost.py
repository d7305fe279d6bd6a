"""Does a shared token-id file pay? Tokenizing a text set against the work it feeds.

    python bench/tokenize_cost.py [--texts 20000] [--out bench/results/tokenize_cost.json]

Tokenizes ``--texts`` support-ticket-like texts (the shipped
``studies/support-tickets.csv`` rows, repeated with a counter so no two are the
same) with the packaged all-MiniLM-L6-v2 tokenizer, as every worker does once
(:meth:`autotransfer.data.datasets.TextSet.encoded`): seconds and the memory of
the ids, beside the seconds of one training epoch's forward passes over the same
texts with the 6-layer model (batch 32, 100 batches timed and scaled).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import torch

from autotransfer.data.batches import make_batch
from autotransfer.data.datasets import load_text_file
from autotransfer.plugins.host import get_plugin_host
from autotransfer.spec.model import BackboneRef

STUDIES = Path(__file__).resolve().parents[1] / "autotransfer" / "_studies"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tokenize_cost.json"))
    args = parser.parse_args()
    base = load_text_file(STUDIES / "support-tickets.csv")
    texts = [f"{base.texts[i % len(base)]} (#{i})" for i in range(args.texts)]
    data = type(base)(texts, torch.zeros(len(texts), dtype=torch.long), base.classes)
    ref = BackboneRef(name="hf:sentence-transformers/all-MiniLM-L6-v2", weights="packaged")
    backbone = get_plugin_host().build(ref, num_classes=4, image_size=64)
    load = [os.getloadavg()[0]]
    tracemalloc.start()
    start = time.perf_counter()
    ids = data.encoded(backbone.preprocessing)
    tokenize = time.perf_counter() - start
    ids_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    backbone.model.eval()
    batches = 20
    with torch.no_grad():
        start = time.perf_counter()
        for b in range(batches):
            x = make_batch(data, slice(b * 32, b * 32 + 32), backbone)
            backbone.features(backbone.model, x)
        forward = (time.perf_counter() - start) / batches * (len(data) / 32)
    load.append(os.getloadavg()[0])
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_1min": load},
        "texts": len(texts), "tokens": sum(map(len, ids)),
        "tokenize_seconds": round(tokenize, 2),
        "ids_megabytes_in_python": round(ids_bytes / 2**20, 1),
        "ids_megabytes_as_int32_file": round(4 * sum(map(len, ids)) / 2**20, 1),
        "forward_seconds_one_pass_estimated": round(forward, 1),
        "tokenize_share_of_one_forward_pass": round(tokenize / forward, 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
