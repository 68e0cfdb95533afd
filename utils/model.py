"""Building the Llama: config, meta-device construction, and world-size-independent init."""

from __future__ import annotations

import copy
import zlib
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from utils.errors import UserError

# Shapes by name, so a run or a benchmark needs no config file. llama-60m ... llama-7b are the
# LLaMA shapes of the GaLore and SLTrain papers (vocabulary 32,000, sequences up to 1,024 tokens,
# 2,048 for 7B); llama2-7b and llama3-8b are Meta's; tinyllama-1.1b is TinyLlama's.
NAMED_SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=1024),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}  # fmt: skip


def load_model_config(
    spec: str, tokenizer_vocab: int, special_token_ids: dict[str, int | None] | None = None
) -> PretrainedConfig:
    """A config from a shape name, a config.json file or a directory holding one.

    The vocabulary grows to the tokenizer's when the tokenizer has more tokens, which is what
    resizing the embeddings of a model built from this config amounts to. The tokenizer's
    special token ids (`bos_token_id`, `eos_token_id`, `pad_token_id`) replace the config's
    (Llama's defaults are 1 and 2): an exported model's `generate()` stops at its EOS.
    """
    config = _read_config(spec)
    if not hasattr(config, "num_hidden_layers") or not hasattr(config, "hidden_size"):
        raise UserError(f"--config {spec} is not a decoder-only transformer config")
    if tokenizer_vocab > config.vocab_size:
        config.vocab_size = tokenizer_vocab
    config.update(special_token_ids or {})
    config.use_cache = False
    return config


def _read_config(spec: str) -> PretrainedConfig:
    if spec in NAMED_SHAPES:
        return AutoConfig.for_model("llama", **{"vocab_size": 32000, **NAMED_SHAPES[spec]})
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        names = ", ".join(NAMED_SHAPES)
        raise UserError(
            f"--config {spec} not found; give a config.json, its directory, or one of: {names}"
        )
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"--config {path} is not a readable model config ({err})") from err


def build_meta_model(config: PretrainedConfig, attn_implementation: str) -> nn.Module:
    """The model's structure with no storage: each rank later materializes only its shards.

    The model gets its own copy of the config: transformers writes the attention implementation
    into the config it is given, and every layer reads it there at each call, so a second model
    built from a shared config (the FLOP count's) would switch the first one's attention.

    The input embedding has no padding_idx, although the config keeps the tokenizer's
    pad_token_id."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=attn_implementation
        )
    # transformers (4 and 5) makes config.pad_token_id the embedding's padding_idx: that row gets
    # no gradient (and transformers' own init zeroes it). The pad has no role in training (packed
    # rows hold no padding; a padded row's padding is out of the loss, labels -100), while a pad
    # that is also a real token, most often EOS (pad = EOS when a tokenizer has none), would
    # never train, though EOS ends every document. The config keeps pad_token_id: the saved
    # config.json and generation_config.json give it to generate().
    model.get_input_embeddings().padding_idx = None
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers that sharding, checkpointing or compile add."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, device: torch.device) -> None:
    """Materialize and initialize a (possibly sharded) meta model.

    Each parameter is drawn in full from a generator seeded by (seed, its name), then each rank
    keeps its own slice, so the weights are the same for any world size or sharding strategy.
    Only one full parameter exists at a time, never the whole model.
    """
    model.to_empty(device=device)
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        full = _initial_value(owner, canonical_name(name), tuple(param.shape), seed, std, device)
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(full.to_local())
        else:
            param.copy_(full)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):  # sparse layers (slt) set their thresholds
            module.reset_buffers()
    _rebuild_rotary_buffers(model, device)


def _initial_value(owner, name: str, shape: tuple, seed: int, std: float, device) -> torch.Tensor:
    """A module with its own `initial_value` (a sparse layer) initializes its parameters;
    the others follow HF Llama: normal(0, std) matrices, unit norms, zero biases."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if hasattr(owner, "initial_value"):
        return owner.initial_value(name.rpartition(".")[2], generator, std)
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)


def _rebuild_rotary_buffers(model: nn.Module, device: torch.device) -> None:
    """Rotary frequencies are computed in the module's constructor, not stored: recompute them."""
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            with torch.device(device):
                fresh = type(module)(config=module.config)
            module._buffers.update(fresh._buffers)
            tensors = {k: v for k, v in vars(fresh).items() if isinstance(v, torch.Tensor)}
            module.__dict__.update(tensors)


def count_parameters(model: nn.Module, *, exclude_embedding: bool = False) -> int:
    """Parameters of the full (unsharded) model, index tensors (SLTrain's support) included."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embedding:
        total -= model.get_input_embeddings().weight.numel()
    return total


def trainable_parameters(model: nn.Module) -> int:
    """Values the optimizer trains, in the full (unsharded) model: no frozen weights (supermask)
    and no index tensors (SLTrain's support)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def dense_parameters(config: PretrainedConfig, *, exclude_embedding: bool = False) -> int:
    """Parameters of the dense model of `config` (built on the meta device: no memory)."""
    return count_parameters(build_meta_model(config, "sdpa"), exclude_embedding=exclude_embedding)
