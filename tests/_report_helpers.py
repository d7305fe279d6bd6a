"""Synthetic studies for the report, dashboard and concurrency tests: no training.

Trials carry the same params, user attrs and intermediate values (val accuracy
per epoch) as the search's real trials, so the report sees what it would see
after ``autotransfer search``. Also runnable as a writer process:
``python _report_helpers.py STORAGE_URL STUDY_NAME N_TRIALS [PAUSE_S]`` appends
N_TRIALS trials one by one through ``autotransfer.store.storage.open_storage``, pausing
PAUSE_S seconds after each reported epoch.
"""

from __future__ import annotations

import math
import random
import sys
import time

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from autotransfer.spec.model import load_spec
from autotransfer.store.records import SPEC_ATTR, TEST_METRICS_ATTR
from autotransfer.store.storage import open_storage
from autotransfer.store.summary import best_trial

BACKBONES = ["timm:tf_efficientnet_lite0@packaged", "timm:resnet18@pretrained"]
N_BLOCKS = {BACKBONES[0]: 17, BACKBONES[1]: 6}
DISTRIBUTIONS = {
    "backbone": CategoricalDistribution(BACKBONES),
    "freeze": FloatDistribution(0.0, 1.0),
    "lr": FloatDistribution(1e-5, 1e-2, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    "batch_size": CategoricalDistribution([16, 32, 64]),
    "alpha": FloatDistribution(0.0, 0.9),
}
EPOCHS = 4


def fake_trial(i: int, rng: random.Random) -> optuna.trial.FrozenTrial:
    """Trial ``i``: every 4th pruned after epoch 1 or 2, every 7th failed, others complete."""
    backbone = BACKBONES[i % 2]
    params = {
        "backbone": backbone,
        "freeze": rng.random(),
        "lr": 10 ** rng.uniform(-5, -2),
        "weight_decay": 10 ** rng.uniform(-6, -2),
        "batch_size": rng.choice([16, 32, 64]),
        "alpha": rng.uniform(0.0, 0.9),
    }
    n = N_BLOCKS[backbone]
    attrs: dict[str, object] = {
        "n_blocks": n,
        "frozen_blocks": round(params["freeze"] * n),
        "seconds": round(rng.uniform(5, 60), 2),
    }
    if i % 7 == 6:
        attrs["fail_reason"] = "oom"
        attrs["fail_message"] = "CUDA out of memory (synthetic)"
        return optuna.create_trial(
            state=TrialState.FAIL, params=params, distributions=DISTRIBUTIONS, user_attrs=attrs
        )
    ceiling = 0.6 + 0.35 * rng.random() - 0.2 * params["alpha"] * (i % 2)
    epochs = 1 + i % 2 if i % 4 == 3 else EPOCHS
    curve = {e: round(ceiling * (1 - math.exp(-e)) + 0.01 * rng.random(), 4)
             for e in range(1, epochs + 1)}
    best_epoch = max(curve, key=lambda e: curve[e])
    attrs.update(
        epochs_run=epochs,
        best_epoch=best_epoch,
        val_accuracy=curve[best_epoch],
        val_f1=round(curve[best_epoch] - 0.02, 4),
    )
    if epochs < EPOCHS:
        attrs["pruned_at_epoch"] = epochs
        return optuna.create_trial(
            state=TrialState.PRUNED, params=params, distributions=DISTRIBUTIONS,
            user_attrs=attrs, intermediate_values=curve,
        )
    return optuna.create_trial(
        value=curve[best_epoch], params=params, distributions=DISTRIBUTIONS, user_attrs=attrs,
        intermediate_values=curve,
    )


def digits_test_record() -> dict:
    """Test metrics as the search stores them, for 10 digit classes and 1,076
    test images: 94 mistakes, each class confused with the next one."""
    from autotransfer.engine.trainer import Metrics

    support = [108] * 6 + [107] * 4
    confusion = [[0] * 10 for _ in range(10)]
    for i, n in enumerate(support):
        wrong = 9 + (i % 3 == 0)  # 4 classes with 10 mistakes, 6 with 9: 94 in all
        confusion[i][i] = n - wrong
        confusion[i][(i + 1) % 10] = wrong
    correct = sum(confusion[i][i] for i in range(10))
    metrics = Metrics(accuracy=correct / 1076, macro_f1=0.9, loss=0.0, confusion=confusion)
    record = metrics.record([str(i) for i in range(10)])
    record["macro_f1"] = sum(m["f1"] for m in record["per_class"].values()) / 10
    return record


def make_study(storage_url: str, name: str = "synthetic", n_trials: int = 12,
               seed: int = 0, test_metrics: bool = True) -> optuna.Study:
    """A study like ``autotransfer search`` leaves behind, with ``n_trials`` trials."""
    spec = load_spec(None).model_dump(mode="json")
    spec["name"] = name
    study = optuna.create_study(
        storage=open_storage(storage_url), study_name=name, direction="maximize"
    )
    study.set_user_attr(SPEC_ATTR, spec)
    rng = random.Random(seed)
    for i in range(n_trials):
        study.add_trial(fake_trial(i, rng))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if test_metrics and complete:
        best = best_trial(study)
        study.set_user_attr(TEST_METRICS_ATTR, {str(best.number): digits_test_record()})
    return study


def append_trials(storage_url: str, name: str, n_trials: int, seed: int = 1,
                  pause: float = 0.0) -> int:
    """Append ``n_trials`` trials one at a time, as a running search would."""
    study = optuna.load_study(study_name=name, storage=open_storage(storage_url))
    rng = random.Random(seed)
    start = len(study.trials)
    for i in range(start, start + n_trials):
        trial = study.ask(DISTRIBUTIONS)  # a RUNNING trial, written like the objective does
        ft = fake_trial(i, rng)
        for k, v in ft.user_attrs.items():
            trial.set_user_attr(k, v)
        for step, v in ft.intermediate_values.items():
            trial.report(v, step)
            time.sleep(pause)  # an "epoch"
        if ft.state == TrialState.COMPLETE:
            study.tell(trial, ft.value)
        else:
            study.tell(trial, state=ft.state)
    return n_trials


if __name__ == "__main__":
    url, study_name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    done = append_trials(url, study_name, n, pause=float(sys.argv[4]) if len(sys.argv) > 4 else 0)
    print(f"wrote {done} trials", flush=True)
