"""Tiny text fixtures made offline: a labelled sentence set, a WordPiece vocabulary
written from it, and a random-init 2-layer BERT saved with its tokenizer.

Shared by the text tests (conformance, data, search, export, predict); nothing
downloads. The sentences are three easy topics so a tiny model learns them.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

TOPICS = {
    "food": ["pasta", "soup", "bread", "cheese", "salad", "rice", "cake", "pizza"],
    "sport": ["football", "tennis", "golf", "rugby", "hockey", "cricket", "boxing", "rowing"],
    "weather": ["rain", "snow", "wind", "fog", "sunshine", "storm", "frost", "hail"],
}
FRAMES = [
    "i really like {w}",
    "we talked about {w} today",
    "the {w} was great",
    "there was a lot of {w} yesterday",
    "nobody expected the {w}",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentences(per_class: int = 20, seed: int = 0) -> list[tuple[str, str]]:
    """``(text, label)`` pairs: ``per_class`` per topic, shuffled."""
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        for i in range(per_class):
            rows.append((FRAMES[i % len(FRAMES)].format(w=rng.choice(words)), label))
    rng.shuffle(rows)
    return rows


Columns = tuple[str, str]


def write_csv(
    path: Path, rows: list[tuple[str, str]], columns: Columns = ("text", "label")
) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


def write_jsonl(
    path: Path, rows: list[tuple[str, str]], columns: Columns = ("text", "label")
) -> Path:
    path.write_text(
        "".join(json.dumps(dict(zip(columns, r, strict=True))) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def save_tiny_bert(
    root: Path, hidden: int = 16, layers: int = 2, model_type: str = "bert"
) -> Path:
    """A random-init BERT (hidden 16, 2 layers) and a WordPiece tokenizer whose
    vocabulary is the words of :data:`TOPICS` and :data:`FRAMES`, saved with
    ``save_pretrained``: a model directory that ``hf:<dir>`` loads offline.
    ``model_type`` ``distilbert`` or ``roberta`` saves that architecture instead
    (same tokenizer), for the other layouts of BERT-like encoders."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import AutoModel, BertConfig, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    words = sorted({w for ws in TOPICS.values() for w in ws}
                   | {t for f in FRAMES for t in f.replace("{w}", "").split()}
                   | {"the", "film", "was", "good", "a", "movie", "and", "it"})
    vocab = {t: i for i, t in enumerate(SPECIAL + words + [",", ".", "!"])}
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=64, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    tokenizer.save_pretrained(root)
    if model_type == "distilbert":
        from transformers import DistilBertConfig

        config = DistilBertConfig(vocab_size=len(tokenizer), dim=hidden, n_layers=layers,
                                  n_heads=2, hidden_dim=2 * hidden, max_position_embeddings=64)
        AutoModel.from_config(config).save_pretrained(root)  # no pooler to leave out
        return root
    if model_type == "roberta":
        from transformers import RobertaConfig

        config = RobertaConfig(  # positions start after the padding index
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=66,
            pad_token_id=0,
        )
    else:
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
        )
    AutoModel.from_config(config, add_pooling_layer=False).save_pretrained(root)
    return root
