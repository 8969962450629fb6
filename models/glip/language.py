"""BERT language backbone (``language_backbone.body.model`` in the checkpoint).

The encoder is ``transformers.BertModel`` built from a ``BertConfig`` made
from :class:`~labelmill.models.glip.config.TextConfig` -- nothing is fetched
from the Hugging Face hub; weights come from the GLIP checkpoint.  GLIP-T uses
BERT without the pooler.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel

from .config import TextConfig


def bert_config(cfg: TextConfig) -> BertConfig:
    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=cfg.hidden_act,
        pad_token_id=cfg.pad_token_id,
    )


class BertTextEncoder(nn.Module):
    """Wraps ``BertModel`` as the attribute ``model`` (checkpoint layout)."""

    def __init__(self, cfg: TextConfig, persistent_position_ids: bool = True):
        super().__init__()
        self.model = BertModel(bert_config(cfg), add_pooling_layer=False)
        emb = self.model.embeddings
        if persistent_position_ids and "position_ids" in emb._buffers:
            # Re-register the existing buffer as persistent so it is part of
            # the state dict, as in checkpoints written by transformers<4.31.
            emb.register_buffer("position_ids", emb.position_ids, persistent=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (B, L, D).  Padded positions hold garbage."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state


class LanguageBackbone(nn.Module):
    def __init__(self, cfg: TextConfig, persistent_position_ids: bool = True):
        super().__init__()
        self.body = BertTextEncoder(cfg, persistent_position_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids, attention_mask)
