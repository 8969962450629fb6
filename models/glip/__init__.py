"""GLIP-T grounded detection in plain PyTorch.

Public API::

    from labelmill.models.glip import (
        GLIPConfig, GLIP, load_glip_weights, GLIPPredictor, Prompt, Phrase,
        Detections, caption_prompt, vocabulary_prompts, load_tokenizer,
    )

    model = GLIP(GLIPConfig.glip_t())
    load_glip_weights(model, "glip_tiny_model_o365_goldg.pth")
    predictor = GLIPPredictor(model, load_tokenizer("bert-base-uncased"), device="cuda")
    dets = predictor.predict(images, [caption_prompt("a dog chasing a red ball")] * len(images))
"""

from .checkpoint import (
    CheckpointError,
    LoadReport,
    load_glip_weights,
    load_state_dict_mapped,
    read_state_dict,
    save_glip_weights,
    to_checkpoint_key,
    to_model_key,
)
from .config import GLIPConfig, SwinConfig, TextConfig
from .model import GLIP, GLIPOutput
from .predictor import Detections, GLIPPredictor
from .text import Phrase, Prompt, caption_prompt, encode_prompts, vocabulary_prompts


def load_tokenizer(name_or_path: str = "bert-base-uncased"):
    """BERT WordPiece tokenizer (fast, with offsets) from a local directory or a hub id."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(name_or_path)


__all__ = [
    "CheckpointError",
    "Detections",
    "GLIP",
    "GLIPConfig",
    "GLIPOutput",
    "GLIPPredictor",
    "LoadReport",
    "Phrase",
    "Prompt",
    "SwinConfig",
    "TextConfig",
    "caption_prompt",
    "encode_prompts",
    "load_glip_weights",
    "load_state_dict_mapped",
    "load_tokenizer",
    "read_state_dict",
    "save_glip_weights",
    "to_checkpoint_key",
    "to_model_key",
    "vocabulary_prompts",
]
