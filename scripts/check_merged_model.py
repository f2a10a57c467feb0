#!/usr/bin/env python3
"""Checks a `fedsb merge` directory with Hugging Face transformers alone.

`fedsb merge --model BASE --adapter-file FILE --out DIR` writes DIR as a
plain model (W + B·R·A in every adapted linear) plus `fedsb-head.safetensors`,
the classification head on the attention-masked mean of the last hidden
state. This loads DIR with `transformers.AutoModel` (no fedsb code), runs
the head on a labelled TSV/CSV and prints accuracy and mean cross-entropy as
one JSON line, to compare with `fedsb eval` of the adapter file on the base
model (README, "The trained model").

`fedsb merge --peft` writes DIR as a PEFT LoRA adapter instead; `--peft DIR`
loads the base model it names (or `--base`) with `AutoModel`, the adapter
with `peft.PeftModel.from_pretrained`, and reports how many linears PEFT
adapted besides the same accuracy and loss.

Needs: pip install torch transformers safetensors (and peft for --peft)
Usage:
  python3 scripts/check_merged_model.py --merged DIR --eval data/sst2/dev.tsv --limit 200
  python3 scripts/check_merged_model.py --peft DIR --eval data/sst2/dev.tsv --limit 200
"""

import argparse
import csv
import json

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer


def read_rows(path, labels):
    """(text, class id) rows of a TSV/CSV with a header: the first column is
    the text, the last the label (a class name or a class id)."""
    delimiter = "\t" if path.endswith(".tsv") else ","
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        next(reader)
        for r in reader:
            if not r:
                continue
            text, label = r[0], r[-1].strip()
            rows.append((text, labels.index(label) if label in labels else int(label)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--merged")
    which.add_argument("--peft")
    ap.add_argument("--base", help="--peft: the base model (default: the adapter's base_model_name_or_path)")
    ap.add_argument("--eval", required=True)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=128)
    args = ap.parse_args()

    directory = args.merged or args.peft
    with safe_open(f"{directory}/fedsb-head.safetensors", framework="pt") as f:
        weight = f.get_tensor("classifier.weight").double()
        bias = f.get_tensor("classifier.bias").double()
        labels = json.loads((f.metadata() or {}).get("labels", "[]"))
    report = {}
    if args.merged:
        tokenizer = AutoTokenizer.from_pretrained(args.merged)
        model = AutoModel.from_pretrained(args.merged).float().eval()
    else:
        from peft import PeftModel

        with open(f"{args.peft}/adapter_config.json", encoding="utf-8") as f:
            base = args.base or json.load(f)["base_model_name_or_path"]
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(base).float(), args.peft).eval()
        report["lora_modules"] = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    rows = read_rows(args.eval, labels)
    if args.limit:
        rows = rows[: args.limit]
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(rows), args.batch):
            chunk = rows[i : i + args.batch]
            enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True,
                            max_length=args.max_seq_len, return_tensors="pt")
            hidden = model(**enc).last_hidden_state.double()
            mask = enc["attention_mask"].unsqueeze(-1).double()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            logits = pooled @ weight.T + bias
            y = torch.tensor([l for _, l in chunk])
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    report.update({"accuracy": correct / len(rows), "loss": loss / len(rows),
                   "samples": len(rows), "transformers_model": type(model).__name__})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
