"""A tiny random Llama saved as a model folder with SmolLM2's real tokenizer.

lm_eval's HFLM needs a real tokenizer, so the folder pairs the default model's tokenizer
with a tiny LlamaConfig whose vocabulary matches it (49,152 tokens, hidden size 32).
The folder loads through ``superweight.models.load_model`` like any local model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from superweight.coordinates import SuperWeight
from tiny_models import plant_super_weight

PLANTED = SuperWeight(1, 5, 17)
TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 40


def save_tiny_folder_model(tokenizer, folder: Path, seed: int = 0) -> Path:
    """Save a 4-layer random Llama with a super weight planted at :data:`PLANTED` into ``folder``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text(folder: Path) -> Path:
    """Write a short English text file for perplexity tests and return its path."""
    path = folder / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path
