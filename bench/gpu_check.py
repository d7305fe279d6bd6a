"""The GPU side of issue 13 in one run (``bench/gpu_check.sh`` calls this).

Sections, each a part of the results JSON / Markdown:

1. ``throughput``: one trial's training epoch inside the engine (the
   ``Trainer``: gather from the decoded uint8 data on the device, normalise,
   augment, forward/backward in the worker's precision and layout, AdamW,
   OneCycle) against plain PyTorch loops on the same model and batch: ``plain``
   does the same data work (gather, normalise, the same crop/flip as one
   ``grid_sample``), ``reference`` is the loop of the shared
   ``reference_throughput.py`` (pre-made random batch on the device, no data
   work). Full fine-tune and 75 % frozen.
2. ``study``: ``autotransfer search --gpus all`` on generated images; the
   fraction of wall time the GPU is busy (NVML utilisation, sampled), trial
   start-up time, images/s over the study; then ``--trials-per-gpu`` 2 and 4.
3. ``oom``: a trial forced out of memory (``train.min_batch_size`` = its batch);
   memory reserved before and after.

``--cpu-smoke`` runs every section on the CPU at toy sizes (GPUs simulated for
the packing run), so the script is tested in CI; ``--cpu-compare`` runs only
section 1 on the CPU with Lite0 (packaged), digits, 64 px, batch 32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ throughput


def _engine_trainer(key: str, images: torch.Tensor, labels: torch.Tensor, batch: int,
                    freeze: float, train: dict, classes: int):
    from autotransfer.data.datasets import ImageSet, Splits
    from autotransfer.engine.device import WorkerDevice
    from autotransfer.engine.trainer import Trainer, TrialParams
    from autotransfer.plugins.host import get_plugin_host
    from autotransfer.spec.model import BackboneRef, validate_spec

    size = images.shape[-1]
    spec = validate_spec({
        "name": "bench", "data": {"path": "sklearn:digits", "image_size": size},
        "search": {"backbones": [key], "freeze": freeze, "lr": 1e-4, "batch_size": batch,
                   "alpha": 0.0},
        "train": {"epochs": 3, **train},
    })
    device = WorkerDevice(spec.train)
    names = [str(i) for i in range(classes)]
    data = device.data(ImageSet(images, labels, names))
    splits = Splits(data, data, data)
    torch.manual_seed(0)
    backbone = get_plugin_host().build(BackboneRef.parse(key), num_classes=classes,
                                       image_size=size)
    params = TrialParams(key, freeze, 1e-4, 1e-4, batch, 0.0)
    trainer = Trainer(backbone, splits, params, spec, 0, placement=device.placement(backbone))
    return trainer, spec


def engine_epoch(key, images, labels, batch, freeze, train, classes):
    """One training epoch of a trial inside the engine (the ``Trainer``), and
    where it runs."""
    trainer, _ = _engine_trainer(key, images, labels, batch, freeze, train, classes)
    return trainer._train_epoch, trainer.device, trainer.placement.record


def plain_epoch(key, images, labels, batch, freeze, train, classes, data_work: bool):
    """One epoch of a plain loop on the same model (built, frozen and placed
    like the engine's): ``data_work`` gathers, normalises and augments each
    batch as the engine does; else one pre-made random batch (the shared
    reference loop's step: AdamW, autocast, channels_last)."""
    trainer, spec = _engine_trainer(key, images, labels, batch, freeze, train, classes)
    placement, model = trainer.placement, trainer.backbone.model
    device = placement.device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-4, total_steps=100_000)
    data = trainer.splits.train.images
    y_all = trainer.splits.train.labels.to(device)
    pre = trainer.backbone.preprocessing
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    fixed = placement.batch(torch.randn(batch, *images.shape[1:], device=device))
    fixed_y = torch.randint(0, classes, (batch,), device=device)
    g = torch.Generator().manual_seed(0)
    model.train()
    steps = math.ceil(len(labels) / batch)

    def batch_at() -> tuple[torch.Tensor, torch.Tensor]:
        if not data_work:
            return fixed, fixed_y
        idx = torch.randperm(len(labels), generator=g)[:batch].to(data.device)
        x = data[idx].to(device, non_blocking=True).float().div_(255)
        x = (x - mean) / std
        n = x.shape[0]
        u = torch.rand((n, 5), generator=g).to(device)
        area = 0.8 + 0.2 * u[:, 0]  # the default crop_scale (0.8, 1.0)
        ratio = torch.exp((u[:, 1] * 2 - 1) * math.log(4 / 3))
        sx, sy = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
        theta = torch.zeros((n, 2, 3), device=device)
        theta[:, 0, 0] = sx * torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta[:, 0, 2] = (1 - sx) * (u[:, 2] * 2 - 1)
        theta[:, 1, 1] = sy
        theta[:, 1, 2] = (1 - sy) * (u[:, 3] * 2 - 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
        return placement.batch(x), y_all[idx.to(device)]

    def epoch() -> None:
        for _ in range(steps):
            x, y = batch_at()
            with placement.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    return epoch


def throughput_rows(models, size, batch, n_images, classes, train, images=None, labels=None,
                    freezes=(0.0, 0.75), rounds: int = 1):
    """Images/s of one training epoch: the engine, the plain loop with the same
    data work, the reference loop (random batch). Each runs one warm-up epoch
    (cuDNN autotuning, allocator), then ``rounds`` timed epochs, the three
    interleaved (so a change in the machine's load hits them alike); the median
    counts. The feature cache is off (``train.feature_cache: false``) so the
    engine does the same work as the loops; with it, a frozen trial's later
    epochs skip the prefix altogether."""
    if images is None:
        images = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8)
        labels = torch.randint(0, classes, (n_images,))
    train = {"feature_cache": False, **train}
    rows = []
    for key in models:
        for freeze in freezes:
            run, device, record = engine_epoch(key, images, labels, batch, freeze, train,
                                               classes)
            runs = {"engine": run,
                    "plain": plain_epoch(key, images, labels, batch, freeze, train, classes,
                                         True),
                    "reference": plain_epoch(key, images, labels, batch, freeze, train,
                                             classes, False)}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for r in range(rounds + 1):
                for name, epoch in runs.items():
                    sync(device)
                    start = time.perf_counter()
                    epoch()
                    sync(device)
                    if r:  # round 0 warms up
                        times[name].append(time.perf_counter() - start)
            n = math.ceil(len(labels) / batch) * batch
            speed = {k: n / statistics.median(v) for k, v in times.items()}
            row = {"model": key, "freeze": freeze, "images": len(labels), "batch": batch,
                   "rounds": rounds,
                   "engine_img_s": round(speed["engine"], 1),
                   "plain_img_s": round(speed["plain"], 1),
                   "reference_img_s": round(speed["reference"], 1),
                   "ratio_plain": round(speed["engine"] / speed["plain"], 3),
                   "ratio_reference": round(speed["engine"] / speed["reference"], 3),
                   "placement": record}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del runs, run
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ study


def _write_image(job: tuple[Path, int, int, int, tuple[int, int, int]]) -> None:
    from PIL import Image

    path, i, size, classes, colour = job
    rng = np.random.default_rng(i)
    noise = rng.integers(-40, 40, size=(size, size, 3))
    img = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def make_images(root: Path, n: int, size: int, classes: int) -> Path:
    """``n`` generated JPEGs of ``classes`` colours plus noise (class folders),
    written by a process pool."""
    from multiprocessing import Pool

    rng = np.random.default_rng(0)
    colours = [tuple(int(v) for v in c) for c in rng.integers(40, 220, size=(classes, 3))]
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"c{i % classes}" / f"{i}.jpg", i, size, classes, colours[i % classes])
            for i in range(n)]
    if n < 200:
        for job in jobs:
            _write_image(job)
    else:
        with Pool(min(16, os.cpu_count() or 1)) as pool:
            pool.map(_write_image, jobs, chunksize=64)
    return root


class Utilisation:
    """Samples the GPU's NVML utilisation (percent of time a kernel ran) in a thread."""

    def __init__(self, period: float = 0.2) -> None:
        self.samples: list[float] = []
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(0))
        except Exception:  # noqa: BLE001 - no NVML (pynvml) or no GPU
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.samples.append(value)
            time.sleep(self.period)

    def __enter__(self) -> Utilisation:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def busy(self) -> float | None:
        return round(statistics.mean(self.samples) / 100, 3) if self.samples else None


def run_study(data: Path, work: Path, name: str, trials: int, backbone: str, size: int,
              batch: int, epochs: int, per_gpu: int, train: dict) -> dict:
    """``autotransfer search --gpus all --trials-per-gpu per_gpu`` on ``data``,
    in this process (one slot: trials run here; more: the CLI starts one worker
    process per slot), with the GPU's utilisation sampled throughout."""
    import contextlib

    import optuna
    import yaml

    from autotransfer.cli import app
    from autotransfer.store.records import (
        DEVICE_ATTR,
        EPOCHS_RUN_ATTR,
        FAIL_MESSAGE_ATTR,
        SECONDS_ATTR,
    )

    spec = {
        "name": name, "data": {"path": str(data), "image_size": size,
                               "split": {"train": 0.8, "val": 0.1, "test": 0.1}},
        "search": {"backbones": [backbone], "freeze": {"low": 0.0, "high": 0.75},
                   "lr": {"low": 1e-4, "high": 3e-3, "log": True}, "batch_size": batch,
                   "alpha": 0.0},
        "train": {"epochs": epochs, **train}, "pruner": {"type": "none"},
        "sampler": {"type": "random"}, "n_trials": trials,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    storage = f"sqlite:///{work / (name + '.db')}"
    args = ["search", str(path), "--storage", storage, "--gpus", "all",
            "--trials-per-gpu", str(per_gpu)]
    log = work / f"{name}.log"
    start = time.perf_counter()
    with Utilisation() as util, open(log, "w") as out, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        try:
            code = app(args, standalone_mode=False)
        except SystemExit as exc:
            code = exc.code
    wall = time.perf_counter() - start
    if code not in (0, None):
        raise RuntimeError(f"search failed ({code}): {log.read_text()[-3000:]}")
    study = optuna.load_study(study_name=name, storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t.user_attrs.get(FAIL_MESSAGE_ATTR) for t in study.trials
              if t.state == optuna.trial.TrialState.FAIL]
    # Start-up: wall time of a finished trial outside its epochs (building the
    # backbone, placing it, saving the checkpoint).
    startup = [
        (t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs[SECONDS_ATTR]
        for t in done if t.datetime_complete and SECONDS_ATTR in t.user_attrs
    ]
    n_train = int(len(list(data.rglob("*.jpg"))) * 0.8)
    images = sum(n_train * int(t.user_attrs.get(EPOCHS_RUN_ATTR) or 0) for t in done)
    return {
        "trials": len(done), "failed": failed, "trials_per_gpu": per_gpu, "backbone": backbone,
        "images": len(list(data.rglob("*.jpg"))), "image_size": size, "epochs": epochs,
        "wall_s": round(wall, 1), "gpu_busy": util.busy,
        "startup_s_median": round(statistics.median(startup), 2) if startup else None,
        "startup_s_max": round(max(startup), 2) if startup else None,
        "train_img_s_over_study": round(images / wall, 1),
        "devices": sorted({json.dumps(t.user_attrs.get(DEVICE_ATTR), sort_keys=True)
                           for t in done}),
    }


# ------------------------------------------------------------------ OOM


def oom_check(key: str, size: int, batch: int, inject_above: int | None = None) -> dict:
    """A trial that runs out of memory at its floor (``train.min_batch_size`` =
    its batch) fails with reason ``oom``; the memory the allocator reserves
    before the trial and after it is freed. ``inject_above``: on the CPU, an
    out-of-memory error is raised for forwards above this many images (there is
    no real one to provoke)."""
    import dataclasses

    from autotransfer.engine.trainer import TrialError, free_memory

    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 2, (batch,))
    cuda = torch.cuda.is_available() and inject_above is None
    free_memory()
    before = torch.cuda.memory_reserved() if cuda else 0
    trainer, _ = _engine_trainer(key, images, labels, batch, 0.0,
                                 {"min_batch_size": batch}, 2)
    if inject_above is not None:
        real = trainer.backbone.features

        def features(model, x):
            if len(x) > inject_above:
                raise torch.OutOfMemoryError("CUDA out of memory (injected by gpu_check)")
            return real(model, x)

        trainer.backbone = dataclasses.replace(trainer.backbone, features=features)
        trainer._features = features
    reason = "no oom"
    try:
        trainer._train_epoch()
    except TrialError as exc:
        reason = exc.reason
    peak = torch.cuda.max_memory_reserved() if cuda else 0
    del trainer
    free_memory()
    after = torch.cuda.memory_reserved() if cuda else 0
    return {"model": key, "batch": batch, "image_size": size, "outcome": reason,
            "reserved_before_gib": round(before / 2**30, 3),
            "reserved_peak_gib": round(peak / 2**30, 3),
            "reserved_after_gib": round(after / 2**30, 3),
            "within_1_gib": after - before <= 2**30}


# ------------------------------------------------------------------ main


def markdown(result: dict) -> str:
    lines = [f"# GPU check: {result['device']}", "",
             f"{result['when']}; torch {result['torch']}; mode {result['mode']}; "
             f"load average {result['load_avg']}", ""]
    if "gpu_tests_exit" in result:
        lines += [f"gpu-marked tests: exit {result['gpu_tests_exit']} "
                  f"({'passed' if result['gpu_tests_exit'] == 0 else 'FAILED'})", ""]
    if result.get("throughput"):
        lines += ["## Training throughput, engine vs plain loops (images/s)", "",
                  "| model | frozen | engine | plain (same data work) | ratio | "
                  "reference (random batch) | ratio |", "|---|---|---|---|---|---|---|"]
        for r in result["throughput"]:
            lines.append(
                f"| {r['model']} | {r['freeze']:.0%} | {r['engine_img_s']} | {r['plain_img_s']} "
                f"| {r['ratio_plain']} | {r['reference_img_s']} | {r['ratio_reference']} |")
    for s in result.get("studies", []):
        lines += ["", f"## Study: {s['trials']} trials of {s['backbone']}, "
                  f"{s['trials_per_gpu']} per GPU", "", "```", json.dumps(s, indent=1), "```"]
    if result.get("oom"):
        lines += ["", "## Out of memory", "", "```", json.dumps(result["oom"], indent=1), "```"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Sizes:
    """What each section runs: the GPU sizes of the issue, or toy ones."""

    models: tuple[str, ...]
    size: int
    batch: int
    n_images: int
    freezes: tuple[float, ...]
    study_images: int
    study_size: int
    study_model: str
    study_batch: int
    study_classes: int
    studies: tuple[tuple[str, int, int], ...]  # (name, trials per GPU, trials)
    study_train: dict
    oom: tuple[str, int, int, int | None]  # model, image size, batch, injected limit


GPU = Sizes(
    models=("timm:resnet50@none", "timm:convnext_tiny@none",
            "timm:vit_small_patch16_224@none", "timm:tf_efficientnet_lite0@none"),
    size=224, batch=128, n_images=128 * 24, freezes=(0.0, 0.75),
    study_images=20_000, study_size=224, study_model="timm:resnet18@none", study_batch=128,
    study_classes=10, studies=(("study", 1, 20), ("packed2", 2, 8), ("packed4", 4, 8)),
    study_train={},
    oom=("timm:convnext_tiny@none", 1024, 512, None),
)
SMOKE = Sizes(
    models=("timm:test_resnet@none",), size=32, batch=8, n_images=16, freezes=(0.75,),
    study_images=30, study_size=32, study_model="timm:test_resnet@none", study_batch=8,
    study_classes=3, studies=(("study", 1, 2),), study_train={"precision": "fp32"},
    oom=("timm:test_resnet@none", 32, 4, 2),
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--cpu-compare", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--images", type=int, default=0,
                    help="--cpu-compare: the first this many digits (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="--cpu-compare: timed rounds")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    random.seed(0)
    cuda = torch.cuda.is_available() and not (args.cpu_smoke or args.cpu_compare)
    device = torch.cuda.get_device_name(0) if cuda else f"cpu-{os.cpu_count()}core"
    result: dict = {"device": device, "torch": torch.__version__,
                    "when": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(),
                    "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                    "load_avg": [round(v, 1) for v in os.getloadavg()],
                    "mode": "cpu-smoke" if args.cpu_smoke else
                    "cpu-compare" if args.cpu_compare else "gpu"}
    if "GPU_TESTS_EXIT" in os.environ:  # set by gpu_check.sh: pytest -m gpu's exit code
        result["gpu_tests_exit"] = int(os.environ["GPU_TESTS_EXIT"])
    if args.cpu_compare:
        from autotransfer.data.datasets import load_dataset
        from autotransfer.spec.model import DataSpec

        digits = load_dataset(DataSpec(path="sklearn:digits", image_size=64))
        n = args.images or len(digits)
        result["throughput"] = throughput_rows(
            ["timm:tf_efficientnet_lite0@packaged"], 64, 32, 0, 10, {}, digits.images[:n],
            digits.labels[:n], rounds=args.rounds)
        result["load_avg_after"] = [round(v, 1) for v in os.getloadavg()]
        name = "cpu-side-by-side"
    else:
        if args.cpu_smoke:
            sizes, name = SMOKE, "gpu-cpu-smoke"
        else:
            sizes, name = GPU, f"gpu-{device.replace(' ', '_')}"
            torch.cuda.reset_peak_memory_stats()
        clock = time.perf_counter()
        seconds = result["section_s"] = {}
        result["throughput"] = throughput_rows(
            list(sizes.models), sizes.size, sizes.batch, sizes.n_images, 10, {},
            freezes=sizes.freezes)
        seconds["throughput"] = round(time.perf_counter() - clock, 1)
        result["oom"] = oom_check(*sizes.oom)
        seconds["oom"] = round(time.perf_counter() - clock - seconds["throughput"], 1)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            # Worker processes import autotransfer from this tree.
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            data = make_images(work / "data", sizes.study_images, sizes.study_size,
                               sizes.study_classes)
            if args.cpu_smoke:
                # One simulated GPU: the --gpus / --trials-per-gpu path on the CPU.
                os.environ["AUTOTRANSFER_SIMULATED_GPUS"] = "1"
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            common = (sizes.study_model, sizes.study_size, sizes.study_batch, 1)
            result["studies"] = [
                run_study(data, work, study, trials, *common, per_gpu, sizes.study_train)
                for study, per_gpu, trials in sizes.studies
            ]
        seconds["studies"] = round(time.perf_counter() - clock - sum(seconds.values()), 1)
        result["load_avg_after"] = [round(v, 1) for v in os.getloadavg()]
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
