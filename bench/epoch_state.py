"""What the per-epoch resumable state costs: its size, and the time to write it
to the artifact store (``torch.save`` + atomic write with ``fsync``) and to read
it back, for a few timm backbones (random init, no download) with AdamW after one
training step, as :meth:`autotransfer.engine.trainer.Trainer.state_dict` saves it.

    python bench/epoch_state.py                       # the default models
    python bench/epoch_state.py --models resnet18 --repeat 5

Writes ``bench/results/epoch_state.json`` and ``.md``. Not a test: the numbers
depend on the machine, its disk and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODELS = ["tf_efficientnet_lite0", "resnet18", "resnet50", "vit_small_patch16_224"]


def measure(model_name: str, repeat: int, folder: Path) -> dict[str, float | str]:
    import optuna
    import torch

    from autotransfer.data.datasets import ImageSet, Splits
    from autotransfer.engine.trainer import Trainer, TrialParams
    from autotransfer.plugins.host import get_plugin_host
    from autotransfer.spec.model import validate_spec
    from autotransfer.store.resume import load_epoch_state, save_epoch_state
    from autotransfer.store.storage import artifact_store

    key = f"timm:{model_name}@none"
    spec = validate_spec({
        "name": "bench", "data": {"path": "sklearn:digits", "image_size": 64},
        "search": {"backbones": [key], "freeze": 0.0, "lr": 1e-3, "batch_size": 4,
                   "alpha": 0.0},
        "train": {"epochs": 2},
    })
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    labels = torch.arange(8) % 2
    data = ImageSet(images=images, labels=labels, classes=["a", "b"])
    splits = Splits(train=data, val=data, test=data)
    backbone = get_plugin_host().build(spec.search.backbones[0], num_classes=2, image_size=64)
    trainer = Trainer(backbone, splits, TrialParams(key, 0.0, 1e-3, 1e-4, 4, 0.0), spec, 0)
    next(trainer.epochs())  # one epoch: optimiser moments exist, a best state is kept
    weights = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    store = artifact_store(folder)
    trial = optuna.create_study().ask()
    writes, reads = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        artifact_id = save_epoch_state(trial, trainer.state_dict(), store)
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_epoch_state(trial, store)
        reads.append(time.perf_counter() - start)
    size = (folder / artifact_id).stat().st_size
    return {
        "model": model_name,
        "weights_mb": round(weights / 1e6, 1),
        "state_mb": round(size / 1e6, 1),
        "state_over_weights": round(size / weights, 2),
        "write_s_median": round(statistics.median(writes), 3),
        "read_s_median": round(statistics.median(reads), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="autotransfer-bench-") as tmp:
        for name in args.models:
            rows.append(measure(name, args.repeat, Path(tmp) / name))
            print(rows[-1], flush=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.system()} {platform.release()}, torch {torch.__version__}; "
        "artifact store in a temporary directory on ext4"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "epoch_state.json").write_text(
        json.dumps({"machine": machine, "repeat": args.repeat, "results": rows}, indent=2) + "\n"
    )
    lines = [
        "# Epoch state: size and write/read time", "",
        f"Machine: {machine}. Median of {args.repeat}. AdamW, after one epoch "
        "(best state kept). Produced by `python bench/epoch_state.py`.", "",
        "| model | weights MB | state MB | state / weights | write s | read s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['weights_mb']} | {r['state_mb']} | {r['state_over_weights']} "
        f"| {r['write_s_median']} | {r['read_s_median']} |"
        for r in rows
    ]
    (RESULTS / "epoch_state.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
