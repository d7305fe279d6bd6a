"""The device layer: resolution of train.device / precision / channels_last with
CUDA presence and GPU count simulated, mixed precision and channels_last on the
CPU, and an epoch state saved on a GPU resumed on the CPU."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from autotransfer.engine.device import (
    SIMULATED_GPUS_ENV,
    Machine,
    Placement,
    WorkerDevice,
    detect,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
)
from autotransfer.engine.trainer import Trainer, TrialParams, evaluate
from autotransfer.exceptions import SpecError
from autotransfer.spec.model import TrainSpec

NO_GPU = Machine.cpu()
TWO_GPUS = Machine(cuda=True, count=2, names=("A100", "A100"), bf16=True, visible=("0", "1"))
OLD_GPU = Machine(cuda=True, count=1, names=("V100",), bf16=False, visible=("0",))
PARAMS = TrialParams("timm:test_resnet@none", 0.0, 1e-2, 1e-4, 6, 0.0)


@pytest.mark.parametrize(
    ("setting", "machine", "expected"),
    [
        ("auto", NO_GPU, "cpu"), ("auto", TWO_GPUS, "cuda:0"), ("auto", OLD_GPU, "cuda:0"),
        ("cpu", NO_GPU, "cpu"), ("cpu", TWO_GPUS, "cpu"),
        ("cuda", TWO_GPUS, "cuda:0"), ("cuda:1", TWO_GPUS, "cuda:1"),
        ("cuda", NO_GPU, SpecError), ("cuda:0", NO_GPU, SpecError),
        ("cuda:2", TWO_GPUS, SpecError), ("cuda:1", OLD_GPU, SpecError),
    ],
)
def test_device_resolution(setting: str, machine: Machine, expected: object) -> None:
    if expected is SpecError:
        with pytest.raises(SpecError, match=f"train.device is '{setting}'"):
            resolve_device(setting, machine)
    else:
        assert resolve_device(setting, machine) == expected


@pytest.mark.parametrize(
    ("setting", "device", "machine", "expected"),
    [
        ("auto", "cpu", NO_GPU, "fp32"), ("auto", "cpu", TWO_GPUS, "fp32"),
        ("auto", "cuda:0", TWO_GPUS, "bf16"), ("auto", "cuda:0", OLD_GPU, "fp16"),
        ("fp32", "cpu", NO_GPU, "fp32"), ("fp32", "cuda:0", TWO_GPUS, "fp32"),
        ("bf16", "cpu", NO_GPU, "bf16"), ("bf16", "cuda:1", TWO_GPUS, "bf16"),
        ("bf16", "cuda:0", OLD_GPU, SpecError),
        ("fp16", "cuda:0", TWO_GPUS, "fp16"), ("fp16", "cuda:0", OLD_GPU, "fp16"),
        ("fp16", "cpu", NO_GPU, SpecError), ("fp16", "cpu", TWO_GPUS, SpecError),
    ],
)
def test_precision_resolution(
    setting: str, device: str, machine: Machine, expected: object
) -> None:
    if expected is SpecError:
        with pytest.raises(SpecError, match=f"train.precision {setting}"):
            resolve_precision(setting, device, machine)
    else:
        assert resolve_precision(setting, device, machine) == expected


def test_channels_last_resolution(plugin_host) -> None:
    from autotransfer.spec.model import BackboneRef

    conv = plugin_host.build(BackboneRef.parse("timm:test_resnet@none"), num_classes=3,
                             image_size=32)
    vit = plugin_host.build(BackboneRef.parse("timm:test_vit@none"), num_classes=3,
                            image_size=32)
    assert resolve_channels_last("auto", "cuda:0", conv) is True
    assert resolve_channels_last("auto", "cpu", conv) is False
    assert resolve_channels_last("auto", "cuda:0", vit) is False  # one conv: the patch embed
    assert resolve_channels_last(True, "cpu", conv) is True
    assert resolve_channels_last(False, "cuda:0", conv) is False
    text = dataclasses.replace(conv, modality="text")
    assert resolve_channels_last(True, "cuda:0", text) is False


def test_worker_device_records_where_trials_run(plugin_host) -> None:
    from autotransfer.spec.model import BackboneRef

    conv = plugin_host.build(BackboneRef.parse("timm:test_resnet@none"), num_classes=3,
                             image_size=32)
    cpu = WorkerDevice(TrainSpec(), NO_GPU)
    assert cpu.placement(conv).record == {"device": "cpu", "precision": "fp32",
                                          "channels_last": False}
    pinned = Machine(cuda=True, count=1, names=("H100",), bf16=True, visible=("3",))
    gpu = WorkerDevice(TrainSpec(), pinned)
    assert gpu.placement(conv).record == {
        "device": "cuda:0", "gpu": "H100", "gpu_id": "3", "precision": "bf16",
        "channels_last": True,
    }
    with pytest.raises(SpecError, match="no CUDA GPU"):
        WorkerDevice(TrainSpec(device="cuda"), NO_GPU)
    # Exporting on a machine without the study's GPU: evaluation falls back to auto.
    assert WorkerDevice.for_evaluation(TrainSpec(device="cuda", precision="fp16")).name in (
        "cpu", "cuda:0"
    )


def test_simulated_gpus_follow_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setenv(SIMULATED_GPUS_ENV, "4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect().count == 4 and detect().simulated
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    machine = detect()
    assert (machine.count, machine.visible) == (1, ("2",))
    device = WorkerDevice(TrainSpec(), machine)
    assert device.name == "cuda:0" and device.torch_device.type == "cpu"  # computes on the CPU
    assert device.describe()["gpu_id"] == "2"


def test_spec_device_fields_validate(tiny_spec) -> None:
    assert tiny_spec(**{"train.device": "cuda:3"}).train.device == "cuda:3"
    for field, bad in [("device", "gpu"), ("precision", "fp8"), ("channels_last", "maybe")]:
        with pytest.raises(SpecError, match=f"train.{field}"):
            tiny_spec(**{f"train.{field}": bad})


def test_device_fields_may_change_when_a_study_resumes() -> None:
    from autotransfer.store.studies import spec_changes

    stored = {"train": {"device": "auto", "precision": "auto", "channels_last": "auto",
                        "compile": False, "epochs": 2}}
    new = {"train": {"device": "cuda:1", "precision": "fp16", "channels_last": True,
                     "compile": True, "epochs": 2}}
    assert spec_changes(stored, new) == []


def _trainer(plugin_host, spec, splits, placement: Placement | None = None) -> Trainer:
    torch.manual_seed(spec.seed)
    backbone = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    return Trainer(backbone, splits, PARAMS, spec, spec.seed, placement=placement)


def test_bf16_autocast_trains_on_the_cpu(plugin_host, tiny_spec, tiny_splits) -> None:
    spec = tiny_spec(**{"train.epochs": 4, "train.precision": "bf16"})
    device = WorkerDevice(spec.train, NO_GPU)
    assert device.precision == "bf16"
    trainer = _trainer(plugin_host, spec, tiny_splits, device.placement(
        plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)))
    seen: list[torch.dtype] = []
    hook = trainer.backbone.model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    results = list(trainer.epochs())
    hook.remove()
    assert torch.bfloat16 in seen  # the forward really ran in bf16
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in results)
    test = evaluate(trainer.backbone, tiny_splits.test, placement=trainer.placement)
    assert test.accuracy > 1 / 3  # above chance (3 classes)


def test_channels_last_gives_the_same_logits(plugin_host, tiny_spec, tiny_splits) -> None:
    spec = tiny_spec()
    torch.manual_seed(0)
    backbone = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    x = (tiny_splits.val.images.float() / 255).contiguous()
    model = backbone.model.eval()
    with torch.no_grad():
        default = model(x)
        placement = Placement(torch.device("cpu"), "fp32", True, False)
        placement.place_model(model)
        last = model(placement.batch(x))
    assert placement.batch(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(default, last, atol=1e-4)


def test_a_state_saved_on_a_gpu_resumes_on_the_cpu_exactly(
    plugin_host, tiny_spec, tiny_splits, monkeypatch
) -> None:
    """The epoch state's tensors are written as CUDA tensors (their storage
    location tagged cuda:0, as a GPU worker writes them); loading it where no
    GPU is needs ``map_location``, and the trial then goes on exactly."""
    import torch.serialization as ser

    from autotransfer.store.resume import read_epoch_state

    spec = tiny_spec(**{"train.epochs": 3})
    whole, saved = [], io.BytesIO()
    for result in (a := _trainer(plugin_host, spec, tiny_splits)).epochs():
        whole.append(result)
        if result.epoch == 1:
            with monkeypatch.context() as m:
                m.setattr(ser, "location_tag", lambda storage: "cuda:0")
                torch.save(a.state_dict(), saved)
    if not torch.cuda.is_available():
        saved.seek(0)
        with pytest.raises(RuntimeError, match="CUDA"):  # it really is a GPU state
            torch.load(saved, weights_only=True)
    saved.seek(0)
    b = _trainer(plugin_host, spec, tiny_splits)
    b.load_state_dict(read_epoch_state(saved))
    rest = list(b.epochs())
    strip = [dataclasses.replace(r, seconds=0) for r in whole[1:]]
    assert [dataclasses.replace(r, seconds=0) for r in rest] == strip
    assert all(torch.equal(b.best_state[k], v) for k, v in a.best_state.items())


@pytest.mark.gpu
def test_a_trial_trains_on_the_gpu_in_bf16_with_channels_last(
    plugin_host, tiny_spec, tiny_splits
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    spec = tiny_spec(**{"train.epochs": 2})
    device = WorkerDevice(spec.train)
    backbone = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    placement = device.placement(backbone)
    assert placement.device.type == "cuda" and placement.channels_last
    splits = type(tiny_splits)(*(device.data(d) for d in
                                 (tiny_splits.train, tiny_splits.val, tiny_splits.test)))
    assert splits.train.images.device.type == "cuda"  # the data moved once
    trainer = _trainer(plugin_host, spec, splits, placement)
    results = list(trainer.epochs())
    assert all(r.val.loss == r.val.loss for r in results)
    assert next(trainer.backbone.model.parameters()).device.type == "cuda"
    state = trainer.optimizer.state_dict()["state"]
    assert all(v.device.type == "cuda" for s in state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


@pytest.mark.gpu
def test_an_oom_trial_gives_its_memory_back() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from autotransfer.engine.trainer import free_memory

    before = torch.cuda.memory_reserved()
    try:
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError:
        pass
    blocks = [torch.empty(1 << 28, dtype=torch.uint8, device="cuda") for _ in range(8)]
    del blocks
    free_memory()
    assert torch.cuda.memory_reserved() - before < 1 << 30


def test_predict_device_resolution() -> None:
    from autotransfer.exceptions import UserInputError
    from autotransfer.export.predict import resolve_predict_device

    assert resolve_predict_device("cpu", "onnx") == "cpu"
    with pytest.raises(UserInputError, match="device 'gpu' is not valid"):
        resolve_predict_device("gpu", "onnx")
    if not torch.cuda.is_available():
        assert resolve_predict_device("auto", "torchscript") == "cpu"
        with pytest.raises(UserInputError, match="torch sees no CUDA GPU here"):
            resolve_predict_device("cuda:0", "torchscript")


def _nan_at(step_losses_device: str, bad: int, steps: int = 40) -> str:
    from autotransfer.engine.trainer import StepLosses, TrialError

    def check(means: list[float], start: int) -> None:
        for step, mean in enumerate(means, start):
            if mean != mean:
                raise TrialError("non_finite", f"loss became nan at step {step}")

    losses = StepLosses(torch.device(step_losses_device), check)
    with pytest.raises(TrialError) as caught:
        for step in range(steps):
            value = float("nan") if step == bad else 2.0
            losses.add(torch.tensor(value * 4, device=step_losses_device), 4)
        losses.finish()
    return str(caught.value)


def test_step_losses_name_the_exact_step_and_average_per_example() -> None:
    from autotransfer.engine.trainer import StepLosses

    assert _nan_at("cpu", 3, steps=40) == "loss became nan at step 3"
    seen: list[tuple[int, list[float]]] = []
    losses = StepLosses(torch.device("cpu"), lambda means, start: seen.append((start, means)))
    losses.add(torch.tensor(6.0), 3)
    losses.add(torch.tensor(2.0), 1)
    assert losses.finish() == 2.0 and seen == [(0, [2.0]), (1, [2.0])]


@pytest.mark.gpu
def test_step_losses_on_a_gpu_are_checked_without_waiting_and_name_the_step() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert _nan_at("cuda", 21) == "loss became nan at step 21"  # in a non-blocking group
    assert _nan_at("cuda", 39) == "loss became nan at step 39"  # at the epoch's sync


@pytest.mark.gpu
def test_the_feature_cache_keeps_a_frozen_prefix_on_the_gpu(
    plugin_host, tiny_spec, tiny_splits
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from autotransfer.engine.feature_cache import FeatureCache

    spec = tiny_spec(**{"train.epochs": 2})
    device = WorkerDevice(spec.train)
    splits = type(tiny_splits)(*(device.data(d) for d in
                                 (tiny_splits.train, tiny_splits.val, tiny_splits.test)))
    backbone = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    cache = FeatureCache(1.0)
    trainer = Trainer(backbone, splits, dataclasses.replace(PARAMS, freeze=0.75), spec,
                      spec.seed, cache=cache, placement=device.placement(backbone))
    results = list(trainer.epochs())
    assert trainer.point > 0 and trainer.features_cached and cache.hits >= 2
    assert all(t.device.type == "cuda" for t in cache._entries.values())
    assert all(r.val.loss == r.val.loss for r in results)
