"""bertkern.hf: Hugging Face encoders on bertkern's kernels, in place, with one call.

    model = transformers.AutoModelForSequenceClassification.from_pretrained(...)
    bertkern.hf.optimize(model)        # or a SentenceTransformer, a PEFT model, any module holding one
    model(**batch)                     # same class, signature, outputs and Parameter objects
    bertkern.hf.restore(model)         # back to transformers' own forward

Supported encoder stacks (found anywhere inside the module): BERT (``BertModel``, under every
``BertFor*`` head; BERT-architecture checkpoints such as MiniLM), RoBERTa, XLM-RoBERTa,
CamemBERT and ELECTRA (``ElectraModel``: the same embeddings and layer math, plus its optional
``embeddings_project``). A stack configured as a decoder (``is_decoder`` / cross-attention)
keeps transformers' forward for every call. Not supported: DistilBERT (other module layout),
other architectures: ``optimize`` raises, naming what is supported.

See bertkern/hf/encoders.py for what runs and when a call falls back to transformers' forward.
"""
from __future__ import annotations

from bertkern.hf.encoders import SUPPORTED, is_optimized, optimize, restore

__all__ = ["optimize", "restore", "is_optimized", "SUPPORTED"]
