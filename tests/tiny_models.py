"""Tiny random models of every supported architecture, with a planted super weight.

A planted super weight is a large down-projection weight ``W[row, col]`` fed by a large
input channel ``col``: the rows of the up-projection(s) that produce channel ``col`` are
scaled up, so the MLP's hidden activation in ``col`` is large at some tokens, and
``W[row, col]`` turns it into a super activation in output channel ``row``.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

from superweight.adapters import get_adapter

HIDDEN = 64
INTERMEDIATE = 128
VOCAB = 256
LAYERS = 4

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
               num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16),
    "olmo": lambda: transformers.OlmoConfig(**_COMMON, num_key_value_heads=2),
    "olmo2": lambda: transformers.Olmo2Config(**_COMMON, num_key_value_heads=2),
    "phi3": lambda: transformers.Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, num_key_value_heads=2, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=16),
    "stablelm": lambda: transformers.StableLmConfig(**_COMMON, num_key_value_heads=2),
    "starcoder2": lambda: transformers.Starcoder2Config(**_COMMON, num_key_value_heads=2),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS,
                                            n_head=4, n_positions=128),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_COMMON),
    "falcon": lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                num_attention_heads=4, ffn_hidden_size=INTERMEDIATE),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE,
                                          num_hidden_layers=LAYERS, num_attention_heads=4,
                                          word_embed_proj_dim=HIDDEN, max_position_embeddings=128),
}

# Modules (relative to a decoder layer) whose output rows produce the down-projection's
# input channels, and whether they are fused gate+up (Phi-3) or Conv1D (GPT-2).
UP_PROJECTIONS = {
    "gpt2": ["mlp.c_fc"],
    "gpt_neox": ["mlp.dense_h_to_4h"],
    "falcon": ["mlp.dense_h_to_4h"],
    "opt": ["fc1"],
    "starcoder2": ["mlp.c_fc"],
    "phi3": ["mlp.gate_up_proj"],
}
DEFAULT_UP = ["mlp.gate_proj", "mlp.up_proj"]


def make_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[model_type]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@torch.no_grad()
def plant_super_weight(model: nn.Module, layer: int, row: int, col: int, *, gain: float = 60.0,
                       value: float = 40.0) -> None:
    """Make ``layers[layer].down_proj.weight[row, col]`` a super weight (nn.Linear coordinates)."""
    model_type = model.config.model_type
    adapter = get_adapter(model)
    block = adapter.decoder_layers(model)[layer]
    for name in UP_PROJECTIONS.get(model_type, DEFAULT_UP):
        up = block.get_submodule(name)
        if model_type == "gpt2":  # Conv1D stores [in, out]
            up.weight[:, col] *= gain
        elif model_type == "phi3":  # fused [gate; up]
            up.weight[col] *= gain
            up.weight[col + model.config.intermediate_size] *= gain
        else:
            up.weight[col] *= gain
    weight = adapter.down_proj_module(model, layer).weight
    weight[adapter.weight_index(row, col)] = value
    # Post-norm architectures scale the MLP output channel by a norm weight; a large one
    # in channel `row` lets the spike reach the residual stream as it does in real models.
    residual = adapter.residual_output_module(model, layer)
    if residual is not None:
        residual.weight[row] += 30.0


class ByteTokenizer:
    """A tokenizer for tiny models: one token per UTF-8 byte, enough for detection."""

    pad_token = "<pad>"
    eos_token = "<eos>"
    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, return_tensors=None, **kwargs):
        ids = list(text.encode("utf-8")[: 120]) or []
        return transformers.BatchEncoding({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return chr(token_id) if token_id < 128 else f"<0x{token_id:02X}>"


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == snapshot.keys()
    for name, tensor in snapshot.items():
        assert torch.equal(current[name], tensor), f"{name} changed"
