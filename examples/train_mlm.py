"""BERT pretraining with the masked-LM objective (and, with --nsp, next-sentence prediction).

A small, complete BERT: token + position + segment embeddings, an encoder, an MLM head whose
decoder is tied to the word embeddings, and an NSP head on [CLS]. The encoder is either
``nn.TransformerEncoder`` or ``bertkern.Encoder``: the one line that differs is marked
"THE ONE-LINE SWAP" below. Both get the same seed, so the same data and the same initial
weights; with ``--dropout 0`` their loss curves match to float rounding.

    python examples/train_mlm.py --encoder torch
    python examples/train_mlm.py --encoder bertkern
    python examples/train_mlm.py --encoder bertkern --nsp --corpus my_text.txt

Batches are padded to their longest sequence, with a key padding mask (True = padding);
torch computes the padded positions, bertkern skips them. The script prints the fraction of
padding and the throughput in real (non-padding) tokens per second.
"""
from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bertkern

DEFAULT_CORPUS = Path(__file__).with_name("corpus.txt")

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
PAD, CLS, SEP, MASK, UNK = range(len(SPECIAL_TOKENS))
MAX_VOCAB = 30_000  # a large --corpus keeps its most frequent words; the rest become [UNK]
IGNORE = -100  # label of positions that are not predicted (F.cross_entropy's ignore_index)


# ---- data -------------------------------------------------------------------------------------

def split_words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def load_corpus(path: Path) -> list[list[str]]:
    """Paragraphs (separated by blank lines), each a list of sentences."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(block.split())) if s]
        if sentences:
            paragraphs.append(sentences)
    if not paragraphs:
        raise ValueError(f"--corpus {path}: no text found")
    return paragraphs


class WordTokenizer:
    """Lower-cased words and punctuation; the vocabulary is built from the corpus."""

    def __init__(self, paragraphs: list[list[str]]):
        counts = Counter(w for p in paragraphs for s in p for w in split_words(s))
        words = sorted(counts, key=lambda w: (-counts[w], w))[: MAX_VOCAB - len(SPECIAL_TOKENS)]
        self.itos = SPECIAL_TOKENS + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, UNK) for w in split_words(text)]


class PretrainingData:
    """Random BERT pretraining batches from tokenized paragraphs.

    Without NSP an example is [CLS] A [SEP], A a run of 1-2 consecutive sentences. With NSP it
    is [CLS] A [SEP] B [SEP], B the sentence after A (label 0) or, half of the time, a random
    sentence from another paragraph (label 1). Sentence lengths vary, so batches have padding.
    """

    def __init__(self, paragraphs, tokenizer: WordTokenizer, seq_len: int, nsp: bool, seed: int):
        self.docs = [[tokenizer.encode(s) for s in p] for p in paragraphs]
        self.docs = [[s for s in d if s] for d in self.docs]
        self.docs = [d for d in self.docs if d]
        self.vocab_size = len(tokenizer)
        self.seq_len = seq_len
        self.nsp = nsp
        self.rng = random.Random(seed)  # its own generator: identical data whatever the encoder
        if nsp and len(self.docs) < 2:
            raise ValueError("--nsp needs a corpus with at least two paragraphs")
        if seq_len < (5 if nsp else 3):
            raise ValueError(f"--seq-len {seq_len} is too short for [CLS] ... [SEP]")

    def _example(self):
        rng = self.rng
        d = rng.randrange(len(self.docs))
        doc = self.docs[d]
        i = rng.randrange(len(doc))
        if not self.nsp:
            a = doc[i] + (doc[i + 1] if i + 1 < len(doc) and rng.random() < 0.5 else [])
            a = a[: self.seq_len - 2]
            return [CLS] + a + [SEP], [0] * (len(a) + 2), 0
        a = doc[i]
        if i + 1 < len(doc) and rng.random() < 0.5:
            b, is_random = doc[i + 1], 0
        else:
            other = rng.choice([j for j in range(len(self.docs)) if j != d])
            b, is_random = rng.choice(self.docs[other]), 1
        a, b = list(a), list(b)
        while len(a) + len(b) > self.seq_len - 3:  # BERT's truncation: trim the longer one
            (a if len(a) >= len(b) else b).pop()
        tokens = [CLS] + a + [SEP] + b + [SEP]
        segments = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        return tokens, segments, is_random

    def _mask(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """BERT's masking: 15% of the real tokens are predicted; of those 80% become [MASK],
        10% a random token, 10% stay as they are."""
        rng = self.rng
        inputs, labels = list(tokens), [IGNORE] * len(tokens)
        candidates = [i for i, t in enumerate(tokens) if t not in (CLS, SEP)]
        n = max(1, round(0.15 * len(candidates)))
        for i in rng.sample(candidates, min(n, len(candidates))):
            labels[i] = tokens[i]
            r = rng.random()
            if r < 0.8:
                inputs[i] = MASK
            elif r < 0.9:
                inputs[i] = rng.randrange(len(SPECIAL_TOKENS), self.vocab_size)
        return inputs, labels

    def batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        examples = [self._example() for _ in range(batch_size)]
        width = max(len(tokens) for tokens, _, _ in examples)  # pad to the longest in the batch
        input_ids = torch.full((batch_size, width), PAD, dtype=torch.long)
        segment_ids = torch.zeros((batch_size, width), dtype=torch.long)
        mlm_labels = torch.full((batch_size, width), IGNORE, dtype=torch.long)
        for row, (tokens, segments, _) in enumerate(examples):
            inputs, labels = self._mask(tokens)
            input_ids[row, : len(tokens)] = torch.tensor(inputs)
            segment_ids[row, : len(tokens)] = torch.tensor(segments)
            mlm_labels[row, : len(tokens)] = torch.tensor(labels)
        return {
            "input_ids": input_ids,
            "segment_ids": segment_ids,
            "padding_mask": input_ids == PAD,  # (B, S), True = padding: torch's convention
            "mlm_labels": mlm_labels,
            "nsp_labels": torch.tensor([is_random for _, _, is_random in examples]),
        }


# ---- model ------------------------------------------------------------------------------------

class BertForPretraining(nn.Module):
    def __init__(self, encoder: nn.Module, vocab_size: int, max_len: int, d_model: int,
                 dropout: float, nsp: bool):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, d_model)
        self.position_embeddings = nn.Embedding(max_len, d_model)
        self.segment_embeddings = nn.Embedding(2, d_model)
        self.embedding_norm = nn.LayerNorm(d_model)
        self.embedding_dropout = nn.Dropout(dropout)
        self.encoder = encoder
        # MLM head: dense + GELU + LayerNorm, then the decoder tied to the word embeddings.
        self.mlm_dense = nn.Linear(d_model, d_model)
        self.mlm_norm = nn.LayerNorm(d_model)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        # NSP head: BERT's pooler (dense + tanh on [CLS]) and a 2-way classifier.
        self.pooler = nn.Linear(d_model, d_model) if nsp else None
        self.nsp_classifier = nn.Linear(d_model, 2) if nsp else None

    def forward(self, input_ids, segment_ids, padding_mask, mlm_labels):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.segment_embeddings(segment_ids)
        x = self.embedding_dropout(self.embedding_norm(x))  # (B, S, E)
        h = self.encoder(x, src_key_padding_mask=padding_mask)  # (B, S, E)

        # The MLM head runs on the predicted positions only (all of them real tokens).
        predicted = mlm_labels != IGNORE
        m = self.mlm_norm(F.gelu(self.mlm_dense(h[predicted])))  # (P, E)
        mlm_logits = F.linear(m, self.word_embeddings.weight, self.mlm_bias)  # (P, V)
        nsp_logits = None
        if self.nsp_classifier is not None:
            nsp_logits = self.nsp_classifier(torch.tanh(self.pooler(h[:, 0])))  # (B, 2), [CLS]
        return mlm_logits, mlm_labels[predicted], nsp_logits


def init_bert_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """BERT's initialization (normal, std 0.02), from its own seeded generator, by parameter
    name: both encoders have identical names, so both start from the very same numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:  # embeddings, linear and attention projection weights
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("weight"):  # LayerNorm scales
                p.fill_(1.0)
            else:  # biases
                p.zero_()


# ---- progress ---------------------------------------------------------------------------------

class TextBar:
    """A minimal stand-in for tqdm: one carriage-return line on stderr."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix, self.start = total, desc, 0, "", time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def write(self, s: str) -> None:
        sys.stderr.write("\r" + " " * 100 + "\r" + s + "\n")
        self._draw()

    def _draw(self) -> None:
        width = 30
        filled = width * self.n // max(1, self.total)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.n}/{self.total} {elapsed:5.1f}s {self.postfix}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def progress_bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return TextBar(total, desc)
    return tqdm(total=total, desc=desc, dynamic_ncols=True)


# ---- training ---------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encoder", choices=["torch", "bertkern"], default="bertkern",
                   help="nn.TransformerEncoder or bertkern.Encoder, built with identical arguments")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a text file, paragraphs separated by blank lines")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=128, help="maximum sequence length")
    p.add_argument("--d-model", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="encoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--ffn", type=int, default=1024, help="feed-forward width")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout everywhere (0: deterministic)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (10%% warmup, then linear decay)")
    p.add_argument("--seed", type=int, default=0, help="same seed: same data and initial weights")
    p.add_argument("--nsp", action="store_true", help="add the next-sentence-prediction objective")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--log-every", type=int, default=50, help="print a loss line every N steps (0: never)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.d_model % args.heads != 0:
        p.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    paragraphs = load_corpus(args.corpus)
    tokenizer = WordTokenizer(paragraphs)
    data = PretrainingData(paragraphs, tokenizer, args.seq_len, args.nsp, args.seed)

    layer = nn.TransformerEncoderLayer(args.d_model, args.heads, args.ffn, args.dropout,
                                       batch_first=True, activation="gelu")
    # THE ONE-LINE SWAP: the only difference between a PyTorch run and a bertkern run.
    encoder_cls = bertkern.Encoder if args.encoder == "bertkern" else nn.TransformerEncoder
    encoder = encoder_cls(layer, args.layers)

    model = BertForPretraining(encoder, len(tokenizer), args.seq_len, args.d_model, args.dropout, args.nsp)
    init_bert_weights(model, args.seed)
    model.to(device).train()
    torch.manual_seed(args.seed)  # dropout's random stream starts at the same point for both

    # BERT's optimizer: AdamW, no weight decay on biases and LayerNorm, linear warmup and decay.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    warmup = max(1, args.steps // 10)

    def lr_factor(step: int) -> float:
        return min((step + 1) / warmup, max(0.0, (args.steps - step) / max(1, args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"encoder: {type(encoder).__module__}.{type(encoder).__name__} | device: {device} | "
          f"vocab: {len(tokenizer)} | parameters: {n_params / 1e6:.2f}M | "
          f"objective: MLM{' + NSP' if args.nsp else ''}", flush=True)

    losses, real_tokens, total_positions = [], 0, 0
    bar = progress_bar(args.steps, desc=args.encoder)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in data.batch(args.batch_size).items()}
        real_tokens += int((~batch["padding_mask"]).sum())
        total_positions += batch["padding_mask"].numel()

        mlm_logits, mlm_targets, nsp_logits = model(batch["input_ids"], batch["segment_ids"],
                                                    batch["padding_mask"], batch["mlm_labels"])
        loss = F.cross_entropy(mlm_logits, mlm_targets)
        if nsp_logits is not None:
            loss = loss + F.cross_entropy(nsp_logits, batch["nsp_labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()

        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            bar.close()
            raise FloatingPointError(f"loss is {losses[-1]} at step {step}")
        bar.set_postfix_str(f"loss {losses[-1]:.4f}")
        bar.update(1)
        if args.log_every and step % args.log_every == 0:
            bar.write(f"step {step:5d} | loss {losses[-1]:.4f} | "
                      f"{real_tokens / (time.perf_counter() - start):,.0f} tokens/s")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    bar.close()

    tail = losses[-min(10, len(losses)):]
    results = {
        "encoder": args.encoder,
        "final_loss": sum(tail) / len(tail),
        "losses": losses,
        "tokens_per_s": real_tokens / wall,
        "padding_fraction": 1.0 - real_tokens / total_positions,
        "wall_time_s": wall,
        "real_tokens": real_tokens,
    }
    print(f"final loss: {results['final_loss']:.4f} (mean of the last {len(tail)} steps; first step {losses[0]:.4f})")
    print(f"padding: {100 * results['padding_fraction']:.1f}% of the batch positions")
    print(f"throughput: {results['tokens_per_s']:,.0f} tokens/s (real tokens: {real_tokens:,})")
    print(f"wall time: {wall:.1f} s for {args.steps} steps")
    return results


if __name__ == "__main__":
    main()
