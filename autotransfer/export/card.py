"""The export's model card (``README.md``), made from its ``config.json``: what
the model is, how good, how it was found, and how to run it with and without
autotransfer."""

from __future__ import annotations

from typing import Any

from autotransfer.export.format import TEXT_TASK


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def model_card(config: dict[str, Any]) -> str:
    """The export's ``README.md``: what the model is, how good, how it was found."""
    c = config
    test = c["metrics"]["test"] or {}
    val = c["metrics"]["val"]
    states = c["study"]["states"]
    pre = c["preprocessing"]
    t = c["trial"]
    bb = c["backbone"]
    data = c["data"]
    ver = c["verification"]
    params = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(t["params"].items()))
    labels = ", ".join(c["labels"][:50]) + (" ..." if len(c["labels"]) > 50 else "")
    split = _split_line(data)
    text = c["task"] == TEXT_TASK
    kind, noun = ("Text", "texts") if text else ("Image", "images")
    io = _text_io(c) if text else _image_io(c)
    use = _text_use(c) if text else _image_use(c)
    shape = (
        f"texts truncated to {pre['max_length']} tokens" if text
        else f"images at {pre['image_size']} px"
    )
    running = f", {states['running']} running" if states.get("running") else ""
    trials_line = (
        f"{c['study']['n_trials']} trials: {states.get('complete', 0)} complete, "
        f"{states.get('pruned', 0)} pruned, {states.get('fail', 0)} failed{running}."
    )
    tok_line = (
        f"\n- `{c['preprocessing']['tokenizer_dir']}/`: the tokenizer "
        "(`tokenizer.json` loads with the `tokenizers` library or transformers' "
        "`AutoTokenizer`)." if text else ""
    )
    checked = (
        f"{ver.get('batch')} texts, encoded by the exported tokenizer file"
        if text else "a random batch"
    )
    val_row = f"| {_fmt(val['accuracy'])} | {_fmt(val['macro_f1'])} | |"
    held = c.get("model") or {"kind": "trial", "epochs": t["best_epoch"]}
    test_row = _metrics_row(test)
    if held["kind"] == "ensemble":
        members = ", ".join(
            f"trial {m['trial']}" + (f" (x{m['weight']})" if m["weight"] > 1 else "")
            for m in held["members"]
        )
        how = (
            f"chosen greedily on the validation split from their best checkpoints (validation "
            f"accuracy {_fmt(held['val_accuracy'])}), then each trained again with its "
            f"parameters and seed on train + validation ({held['train_examples']} {noun}) for "
            "its best epoch count" if held.get("trained_on") == "train+val" else
            "each from its best checkpoint, chosen greedily on the validation split "
            f"(validation accuracy {_fmt(held['val_accuracy'])})"
        )
        held_line = (
            f"The model is an **ensemble**: the mean of the class probabilities of {members}, "
            f"{how}. Inference runs every member."
        )
        rows = (
            f"| validation (trial {t['number']}'s checkpoint, the best single trial) {val_row}\n"
            f"| test, this ensemble (held out) {test_row}\n"
            f"| test, trial {t['number']}'s checkpoint "
            f"{_metrics_row(c['metrics'].get('trial_test') or {})}\n"
        )
    elif held["kind"] == "refit":
        held_line = (
            f"The weights are a **refit**: trial {t['number']}'s model trained again with its "
            f"parameters and seed on train + validation ({held['train_examples']} {noun}) "
            f"for {held['epochs']} epoch(s), its best epoch count; not the trial's own "
            "checkpoint."
        )
        rows = (
            f"| validation (trial {t['number']}'s checkpoint; chose the trial) {val_row}\n"
            f"| test, this refit model (held out, never trained on) {test_row}\n"
            f"| test, trial {t['number']}'s checkpoint (trained on train only) "
            f"{_metrics_row(c['metrics'].get('trial_test') or {})}\n"
        )
    else:
        held_line = (
            f"The weights are trial {t['number']}'s best checkpoint (epoch "
            f"{_fmt(held['epochs'])}, trained on the train split)."
        )
        rows = (
            f"| validation (used to choose the trial) {val_row}\n"
            f"| test (held out, never seen by the search) {test_row}\n"
        )
    return f"""# {bb["name"]} fine-tuned on {data["path"]}

{kind} classifier ({c["num_classes"]} classes) exported by autotransfer
{c["versions"]["autotransfer"]} from trial {t["number"]} of study `{c["study"]["name"]}`.
{held_line}

## Metrics

| split | accuracy | macro F1 | {noun} |
|---|---|---|---|
{rows}{_per_class(test)}
## Data

{split},
{shape}. Labels, in output order: {labels}.

## Search

{trials_line}
Backbone `{bb["name"]}` with `{bb["weights"]}` weights, {_fmt(t["frozen_blocks"])} of
{_fmt(t["n_blocks"])} trunk blocks frozen, {t["epochs"]} epochs
(best epoch {_fmt(t["best_epoch"])}), retention `{t["retention"]}`.
Parameters of the exported trial:

| parameter | value |
|---|---|
{params}

{io}
## Files

- `{c["files"]["onnx"]}`: ONNX (opset {c["onnx"]["opset"]}), runs with plain onnxruntime.
- `{c["files"]["torchscript"]}`: TorchScript, runs with plain torch (`torch.jit.load`).
- `{c["files"]["weights"]}`: the weights (safetensors) of the `{bb["name"]}` classifier.
- `config.json`: labels, preprocessing, input/output, metrics, versions.{tok_line}

At export both programs were checked against the PyTorch model on {checked}:
max abs logit difference {ver["torchscript_max_abs_diff"]:.1e} (TorchScript),
{ver["onnx_max_abs_diff"]:.1e} (ONNX).

{use}
## Limits

Trained on {c["data"]["path"]} only; expect it to be wrong on {noun} unlike those.
Validation and test metrics come from small splits; see the counts above.
"""


CONFUSION_MAX_CLASSES = 20
"""The card prints the confusion matrix up to this many classes (config.json always)."""


def _cell(name: Any) -> str:
    return str(name).replace("|", "\\|")


def _per_class(test: dict[str, Any]) -> str:
    """The test set's precision, recall and F1 per class and its confusion matrix
    (rows: true class, columns: predicted), as Markdown; empty for test metrics
    stored before these existed."""
    per_class, classes, confusion = (test.get(k) for k in ("per_class", "classes", "confusion"))
    if not per_class or not classes or not confusion:
        return ""
    rows = "\n".join(
        f"| {_cell(name)} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} "
        f"| {m['support']} |"
        for name, m in per_class.items()
    )
    out = (
        "\n### Test set, per class\n\n| class | precision | recall | F1 | support |\n"
        f"|---|---|---|---|---|\n{rows}\n"
    )
    if len(classes) > CONFUSION_MAX_CLASSES:
        return out + (
            f"\nThe confusion matrix ({len(classes)} classes) is in `config.json`, "
            "`metrics.test.confusion` (rows: true class, columns: predicted).\n"
        )
    header = "| true \\ predicted | " + " | ".join(_cell(c) for c in classes) + " |"
    rule = "|---" * (len(classes) + 1) + "|"
    body = "\n".join(
        f"| {_cell(name)} | " + " | ".join(str(v) for v in row) + " |"
        for name, row in zip(classes, confusion, strict=True)
    )
    return out + (
        "\n### Test set, confusion matrix\n\nRows: true class; columns: predicted class.\n\n"
        f"{header}\n{rule}\n{body}\n"
    )


def _split_line(data: dict[str, Any]) -> str:
    """Where the training, validation and test examples came from."""
    fractions = data.get("path_split") or data["split"]
    parts = "/".join(fractions)
    line = (
        f"`{data['path']}`, split per class {parts} = "
        + "/".join(f"{f:g}" for f in fractions.values())
        + f" (seed {data['seed']})"
    )
    given = [f"{name} set `{data[part]}` (given)" for part, name in
             (("val", "validation"), ("test", "test")) if data.get(part)]
    return line + ("; " + ", ".join(given) if given else "")


def _metrics_row(m: dict[str, Any]) -> str:
    return f"| {_fmt(m.get('accuracy'))} | {_fmt(m.get('macro_f1'))} | {_fmt(m.get('n'))} |"


def _image_io(c: dict[str, Any]) -> str:
    pre = c["preprocessing"]
    size = pre["image_size"]
    return f"""## Input and output

Both programs take **float32 NCHW input that is already normalised** and return
**logits** (softmax gives probabilities):

1. decode as RGB, crop the centre square, resize to {size}x{size} ({pre["interpolation"]});
2. scale to [0, 1] (divide by 255);
3. subtract mean {pre["mean"]} and divide by std {pre["std"]}, per channel.

Input `{c["input"]["name"]}` shape (batch, 3, {size}, {size}); output
`{c["output"]["name"]}` shape (batch, {c["num_classes"]}). Normalisation is not part
of the graphs.
"""


def _text_io(c: dict[str, Any]) -> str:
    pre = c["preprocessing"]
    return f"""## Input and output

Both programs take two int64 inputs of shape (batch, sequence), `input_ids` and
`attention_mask`, and return **logits** (softmax gives probabilities), shape
(batch, {c["num_classes"]}). Make them with the tokenizer in `{pre["tokenizer_dir"]}/`
(the fine-tuned backbone's own):

1. encode each text with `{pre["tokenizer_file"]}` (special tokens added), truncated to
   {pre["max_length"]} tokens;
2. pad every text of the batch to the longest with id {pre["pad_token_id"]};
3. `attention_mask` is 1 for real tokens and 0 for padding.

Both axes are dynamic: any batch size and any length up to {pre["max_length"]}.
"""


def _image_use(c: dict[str, Any]) -> str:
    return f"""## Use

```
autotransfer predict THIS_DIR image.png more_images/ --top-k 3
```

```python
import autotransfer
model = autotransfer.load("THIS_DIR")
print(model.predict(["image.png"], top_k=3))
```

Without autotransfer, see config.json for the preprocessing and run `model.onnx` with
onnxruntime (input name `{c["input"]["name"]}`).
"""


def _text_use(c: dict[str, Any]) -> str:
    pre = c["preprocessing"]
    return f"""## Use

```
autotransfer predict THIS_DIR --text "where is my parcel" --top-k 3
autotransfer predict THIS_DIR texts.txt        # one text per line; or a .csv/.jsonl file
```

```python
import autotransfer
model = autotransfer.load("THIS_DIR")
print(model.predict(["where is my parcel"], top_k=3))
```

Without autotransfer (plain `tokenizers` and `onnxruntime`):

```python
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer

tok = Tokenizer.from_file("THIS_DIR/{pre["tokenizer_file"]}")
tok.enable_truncation(max_length={pre["max_length"]})
tok.enable_padding(pad_id={pre["pad_token_id"]})
enc = tok.encode_batch(["where is my parcel", "I was charged twice"])
feed = {{"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}}
logits = ort.InferenceSession("THIS_DIR/model.onnx").run(["logits"], feed)[0]
```
"""
