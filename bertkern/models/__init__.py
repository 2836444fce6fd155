"""Whole models built on bertkern.nn: ``BertModel`` (HF-compatible, ``BertModel.from_hf``)."""
from bertkern.models.bert import BertConfig, BertModel, BertModelOutput

__all__ = ["BertConfig", "BertModel", "BertModelOutput"]
