#!/usr/bin/env python3
"""PyTorch reference of `fedsb train`: the same centralized LoRA-SB recipe,
step for step, so the engine's learning curve can be compared with an
independent implementation (BENCHMARKS.md, "Learning on SST-2").

What is the same as `fedsb train` (aggregator/src/train_cmd.rs):
- the data: the TSV/CSV is read with the same label ids (integer labels are
  class ids), the first --eval-limit rows of the evaluation file;
- the batch order: fedsb's seeded SplitMix64 Fisher-Yates shuffle per epoch
  (`BatchSampler`, seed --seed for training, --seed ^ 0x1417 for the
  initialization samples), re-implemented here bit for bit;
- the head: mean pooling over real tokens, then a linear layer initialised
  with fedsb's `ClassifierHead::init` (uniform ±initializer_range·√3 from
  SplitMix64(seed ^ 0x5eed), bias 0);
- LoRA-SB initialization (BRIEF.md §2): G = Σ_batches ∂L_batch/∂W0 with the
  batch-mean cross-entropy, ΔW = −lr·sign(G), truncated SVD of ΔWᵀ:
  A = Uᵀ, B = V, R₀ = diag(S), on all six linears of every layer;
- training: W0 frozen, y = W0·x + b + B·R·A·x, AdamW (β = 0.9/0.999,
  ε = 1e-8, weight decay 0.01) on every R and the head, constant lr, no
  dropout, tokens truncated at --max-seq-len with dynamic padding.

The tokenizer is the Hugging Face fast tokenizer of the same tokenizer.json,
which the engine's tokenizer matches (shared/engine/tests/fixtures).

Needs: pip install torch transformers   (CPU is enough; --device cuda runs it on a GPU)
Usage:
  python3 scripts/torch_lora_sb_train.py --model models/all-MiniLM-L6-v2 \\
      --train data/sst2/train.tsv --eval data/sst2/dev.tsv --rank 32 \\
      --steps 120 --batch 32 --lr 1e-3 --init-samples 64 --eval-limit 300 \\
      --eval-every 40
  python3 scripts/torch_lora_sb_train.py --model models/all-MiniLM-L6-v2 --bench
Prints one JSON line per evaluation (and, with --bench, the throughput).
"""

import argparse
import csv
import json
import math
import pathlib
import sys
import time

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

MASK64 = (1 << 64) - 1
DEVICE = torch.device("cpu")  # --device
ADAPTED = ("query", "key", "value", "attention_output", "intermediate", "output")


class SplitMix64:
    """fedsb's SplitMix64 (shared/engine/src/model/weights.rs)."""

    def __init__(self, seed):
        self.state = seed & MASK64

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def signed(self):
        return (self.next_u64() >> 11) / float(1 << 53) * 2.0 - 1.0


class BatchSampler:
    """fedsb's `BatchSampler` (shared/engine/src/train.rs)."""

    def __init__(self, n, batch, seed):
        self.n, self.batch = n, max(1, batch)
        self.order = list(range(n))
        self.rng = SplitMix64(seed)
        self.epochs = 0
        self._shuffle()

    def _shuffle(self):
        for i in range(len(self.order) - 1, 0, -1):
            j = self.rng.next_u64() % (i + 1)
            self.order[i], self.order[j] = self.order[j], self.order[i]
        self.next = 0

    def next_batch(self):
        if self.n == 0:
            return []
        if self.next >= self.n:
            self.epochs += 1
            self._shuffle()
        end = min(self.next + self.batch, self.n)
        out = self.order[self.next : end]
        self.next = end
        return out


def read_dataset(path, text_col, label_col, label_names=None):
    """Rows of (text, label id); integer labels are class ids, as in fedsb."""
    path = pathlib.Path(path)
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL))
    rows = [r for r in rows if r.get(label_col, "") != ""]
    raw = [r[label_col] for r in rows]
    if label_names is None:
        if all(v.lstrip("-").isdigit() for v in raw):
            label_names = [str(i) for i in range(max(int(v) for v in raw) + 1)]
        else:
            label_names = sorted(set(raw))
    ids = {name: i for i, name in enumerate(label_names)}
    return [(r[text_col], ids[v]) for r, v in zip(rows, raw)], label_names


class LoraSbLinear(nn.Module):
    """y = W0·x + b + B·R·A·x with W0, b, A, B frozen and R trained."""

    def __init__(self, base: nn.Linear, a, b, r):
        super().__init__()
        self.base = base
        self.register_buffer("a", a)  # r × in
        self.register_buffer("b", b)  # out × r
        self.r = nn.Parameter(r)  # r × r

    def forward(self, x):
        return self.base(x) + ((x @ self.a.T) @ self.r.T) @ self.b.T


def adapted_linears(model):
    """The six adapted linears of each layer, in fedsb's order."""
    out = []
    for layer in model.encoder.layer:
        out.append(
            [
                (layer.attention.self, "query"),
                (layer.attention.self, "key"),
                (layer.attention.self, "value"),
                (layer.attention.output, "dense"),
                (layer.intermediate, "dense"),
                (layer.output, "dense"),
            ]
        )
    return out


class Classifier(nn.Module):
    def __init__(self, encoder, num_labels, hidden, std, seed):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_labels)
        rng = SplitMix64(seed)
        half_width = std * math.sqrt(3.0)
        w = [[half_width * rng.signed() for _ in range(hidden)] for _ in range(num_labels)]
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(w, dtype=torch.float32))
            self.head.bias.zero_()

    def forward(self, enc):
        hidden = self.encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def lora_sb_init(model, tokenizer, examples, init_batches, rank, lr, max_len):
    """Replaces the adapted linears with LoRA-SB modules initialised from the
    summed gradients of their base weights (BRIEF.md §2)."""
    for p in model.parameters():
        p.requires_grad_(False)
    linears = [getattr(parent, name) for layer in adapted_linears(model.encoder) for parent, name in layer]
    for lin in linears:
        lin.weight.requires_grad_(True)
        lin.weight.grad = None
    for idx in init_batches:
        enc, labels = encode(tokenizer, examples, idx, max_len)
        loss = nn.functional.cross_entropy(model(enc), labels)
        loss.backward()  # gradients sum over batches
    for layer in adapted_linears(model.encoder):
        for parent, name in layer:
            lin = getattr(parent, name)
            g = lin.weight.grad.detach().double().cpu()
            delta_w = -lr * torch.sign(g)
            u, s, vh = torch.linalg.svd(delta_w.T, full_matrices=False)
            a = u[:, :rank].T.contiguous().float().to(DEVICE)
            b = vh[:rank, :].T.contiguous().float().to(DEVICE)
            r = torch.diag(s[:rank]).float().to(DEVICE)
            lin.weight.grad = None
            lin.weight.requires_grad_(False)
            setattr(parent, name, LoraSbLinear(lin, a, b, r))


def encode(tokenizer, examples, idx, max_len):
    texts = [examples[i][0] for i in idx]
    labels = torch.tensor([examples[i][1] for i in idx], dtype=torch.long)
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return {k: v.to(DEVICE) for k, v in enc.items()}, labels.to(DEVICE)


@torch.no_grad()
def evaluate(model, tokenizer, examples, batch, max_len):
    correct, loss_sum = 0, 0.0
    for start in range(0, len(examples), batch):
        idx = list(range(start, min(start + batch, len(examples))))
        enc, labels = encode(tokenizer, examples, idx, max_len)
        logits = model(enc)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
    n = max(1, len(examples))
    return correct / n, loss_sum / n


def sync():
    """Waits for queued GPU work, so that wall-clock timings are honest."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bench(model, tokenizer, batch, seq, reps):
    """Samples/s of a forward pass and of a training step at full `seq`-token
    sequences (as `cargo xtask bench encoder`)."""
    words = ("the federation trains a tiny matrix " * seq).split()
    text = " ".join(words[: seq * 2])
    enc = tokenizer([text] * batch, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    enc = {k: v.to(DEVICE) for k, v in enc.items()}
    labels = torch.zeros(batch, dtype=torch.long, device=DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    out = {}
    with torch.no_grad():
        model(enc)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            model(enc)
        sync()
        out["forward_samples_per_second"] = batch * reps / (time.perf_counter() - t0)
    loss = nn.functional.cross_entropy(model(enc), labels)
    loss.backward()
    opt.step()
    opt.zero_grad()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        loss = nn.functional.cross_entropy(model(enc), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    sync()
    out["train_samples_per_second"] = batch * reps / (time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train")
    ap.add_argument("--eval")
    ap.add_argument("--text-column", default="sentence")
    ap.add_argument("--label-column", default="label")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init-samples", type=int, default=256)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--bench", action="store_true", help="measure samples/s at batch 32, seq 64 and exit")
    ap.add_argument("--bench-reps", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    encoder = AutoModel.from_pretrained(args.model, attn_implementation="eager")
    encoder.eval()  # no dropout, as fedsb
    encoder.to(DEVICE)
    config = encoder.config

    if args.bench:
        model = Classifier(encoder, 2, config.hidden_size, config.initializer_range, args.seed ^ 0x5EED).to(DEVICE)
        # A LoRA-SB model of rank r with random A, B (the speed does not depend on their values).
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in adapted_linears(model.encoder):
            for parent, name in layer:
                lin = getattr(parent, name)
                a = torch.randn(args.rank, lin.in_features, device=DEVICE) * 0.02
                b = torch.randn(lin.out_features, args.rank, device=DEVICE) * 0.02
                setattr(parent, name, LoraSbLinear(lin, a, b, torch.eye(args.rank, device=DEVICE)))
        for p in model.head.parameters():
            p.requires_grad_(True)
        result = bench(model, tokenizer, 32, 64, args.bench_reps)
        result.update(threads=torch.get_num_threads(), torch=torch.__version__, rank=args.rank, device=str(DEVICE))
        print(json.dumps(result))
        return

    if not args.train or not args.eval:
        ap.error("--train and --eval are required unless --bench")
    train, label_names = read_dataset(args.train, args.text_column, args.label_column)
    evalset, _ = read_dataset(args.eval, args.text_column, args.label_column, label_names)
    if args.eval_limit:
        evalset = evalset[: args.eval_limit]
    print(f"train: {len(train)} examples, eval: {len(evalset)}, classes {label_names}", file=sys.stderr)

    model = Classifier(encoder, len(label_names), config.hidden_size, config.initializer_range, args.seed ^ 0x5EED).to(DEVICE)
    init_sampler = BatchSampler(len(train), args.batch, args.seed ^ 0x1417)
    init_batches, taken = [], 0
    while taken < min(args.init_samples, len(train)):
        idx = init_sampler.next_batch()
        idx = idx[: min(len(idx), args.init_samples - taken)]
        taken += len(idx)
        init_batches.append(idx)
    t0 = time.perf_counter()
    lora_sb_init(model, tokenizer, train, init_batches, args.rank, args.lr, args.max_seq_len)
    print(f"LoRA-SB init on {taken} samples: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    params = [m.r for m in model.modules() if isinstance(m, LoraSbLinear)] + list(model.head.parameters())
    for p in params:
        p.requires_grad_(True)
    print(f"trainable parameters: {sum(p.numel() for p in params)}", file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    sampler = BatchSampler(len(train), args.batch, args.seed)
    train_seconds, samples = 0.0, 0
    for step in range(1, args.steps + 1):
        idx = sampler.next_batch()
        enc, labels = encode(tokenizer, train, idx, args.max_seq_len)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(enc), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sync()
        train_seconds += time.perf_counter() - t0
        samples += len(idx)
        if step % args.log_every == 0:
            print(f"step {step}: loss {loss.item():.4f}, {samples / train_seconds:.1f} samples/s", file=sys.stderr)
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            acc, eval_loss = evaluate(model, tokenizer, evalset, args.batch, args.max_seq_len)
            print(
                json.dumps(
                    {
                        "step": step,
                        "eval_accuracy": acc,
                        "eval_loss": eval_loss,
                        "eval_samples": len(evalset),
                        "samples_per_second": samples / train_seconds,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
