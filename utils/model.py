"""Building the Llama: config, meta-device construction, and world-size-independent init."""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

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


# What build_meta_model builds and the rest assumes (slt/ patches q_proj ... down_proj of
# model.model.layers; convert.py exports a LlamaForCausalLM).
MODEL_TYPES = ("llama",)
# Without these transformers fills in its default 7B Llama: a config must give its shape.
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ROPE_TYPES = {"default", *ROPE_INIT_FUNCTIONS}


def _integer(minimum: int, nullable: bool = False) -> Callable[[Any], bool]:
    def valid(value: Any) -> bool:
        if value is None:
            return nullable
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    return valid


def _number(
    low: float, high: float = math.inf, low_included: bool = False
) -> Callable[[Any], bool]:
    def valid(value: Any) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        return (low <= value if low_included else low < value) and value < high

    return valid


# field -> (is the value valid, what a valid value is); a field that is absent keeps
# transformers' Llama default, other fields are left to transformers.
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "vocab_size": (_integer(1), "an integer >= 1"),
    "hidden_size": (_integer(1), "an integer >= 1"),
    "intermediate_size": (_integer(1), "an integer >= 1"),
    "num_hidden_layers": (_integer(1), "an integer >= 1"),
    "num_attention_heads": (_integer(1), "an integer >= 1"),
    "num_key_value_heads": (_integer(1, nullable=True), "an integer >= 1 or null"),
    "head_dim": (_integer(2, nullable=True), "an even integer >= 2 or null"),
    "max_position_embeddings": (_integer(2), "an integer >= 2"),
    "rms_norm_eps": (_number(0), "a number > 0"),
    "rope_theta": (_number(0), "a number > 0"),
    "initializer_range": (_number(0), "a number > 0"),
    "attention_dropout": (_number(0, 1, low_included=True), "a number in [0, 1)"),
    "hidden_act": (lambda v: isinstance(v, str) and v in ACT2FN, "an activation, such as silu"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
    "attention_bias": (lambda v: isinstance(v, bool), "true or false"),
    "mlp_bias": (lambda v: isinstance(v, bool), "true or false"),
    "rope_scaling": (
        lambda v: v is None or _rope_scaling(v),
        f"null or an object with a rope_type in {sorted(ROPE_TYPES)} and a factor >= 1",
    ),
}


def _rope_scaling(value: Any) -> bool:
    if not isinstance(value, dict) or value.get("rope_type", value.get("type")) not in ROPE_TYPES:
        return False
    return "factor" not in value or _number(1, low_included=True)(value["factor"])


def check_model_config(values: Any, source: str) -> None:
    """Refuse a model config (a parsed config.json, or a preset's fields) that is not one
    Llama of an explicit, consistent shape. `source` names it in the error: `--config FILE`."""
    if not isinstance(values, dict):
        kinds = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(values), "a number")
        raise UserError(f"{source} holds {kind}, not a JSON object of model fields such as "
                        f"model_type and hidden_size")  # fmt: skip
    if "model_type" not in values:
        raise UserError(f'{source}: model_type is missing; give "model_type": "llama"')
    if values["model_type"] not in MODEL_TYPES:
        raise UserError(f"{source}: model_type must be one of {list(MODEL_TYPES)}, not "
                        f"{_shown(values['model_type'])}: this project trains Llama models")  # fmt: skip
    missing = [name for name in REQUIRED_FIELDS if name not in values]
    if missing:
        raise UserError(f"{source}: missing {', '.join(missing)}; give the model's shape")
    for name, (valid, expected) in FIELD_RULES.items():
        if name in values and not valid(values[name]):
            raise UserError(f"{source}: {name} must be {expected} (got {_shown(values[name])})")
    heads = values["num_attention_heads"]
    kv_heads = values.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise UserError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                        f"num_key_value_heads ({kv_heads})")  # fmt: skip
    hidden, head_dim = values["hidden_size"], values.get("head_dim")
    if head_dim is None and hidden % heads:
        raise UserError(f"{source}: hidden_size ({hidden}) must be a multiple of "
                        f"num_attention_heads ({heads}), or give head_dim")  # fmt: skip
    # Rotary embeddings turn pairs of coordinates: a head's width must be even.
    if head_dim is not None and head_dim % 2:
        raise UserError(f"{source}: head_dim must be even (got {head_dim})")
    if head_dim is None and hidden // heads % 2:
        raise UserError(f"{source}: hidden_size / num_attention_heads ({hidden} / {heads}) must "
                        "be even (the width of a head); change them or give head_dim")  # fmt: skip


def load_model_config(
    spec: str, tokenizer_vocab: int, special_token_ids: dict[str, int | None] | None = None
) -> PretrainedConfig:
    """A config from a shape name, a config.json file or a directory holding one, checked by
    check_model_config (a bad one is a UserError).

    The vocabulary grows to the tokenizer's when the tokenizer has more tokens, which is what
    resizing the embeddings of a model built from this config amounts to. The tokenizer's
    special token ids (`bos_token_id`, `eos_token_id`, `pad_token_id`) replace the config's
    (Llama's defaults are 1 and 2): an exported model's `generate()` stops at its EOS.
    """
    if spec in NAMED_SHAPES:
        values = {"model_type": "llama", "vocab_size": 32000, **NAMED_SHAPES[spec]}
        source = f"--config {spec}"
        check_model_config(values, source)
    else:
        file = _config_file(spec)
        values, source = read_model_config_file(file, "--config"), f"--config {file}"
    config = build_config(values, source)
    if tokenizer_vocab > config.vocab_size:
        config.vocab_size = tokenizer_vocab
    config.update(special_token_ids or {})
    config.use_cache = False
    return config


def read_model_config_file(file: Path, flag: str) -> dict[str, Any]:
    """The fields of a model's config.json, checked by check_model_config."""
    source = f"{flag} {file}"
    try:
        values = json.loads(file.read_bytes().decode("utf-8-sig"))
    except OSError as err:
        raise UserError(f"{source} cannot be read ({err.strerror}); give a config.json") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{source} is not a readable model config: not UTF-8 text (byte "
                        f"{err.start}); give a config.json") from err  # fmt: skip
    except (ValueError, RecursionError) as err:  # not JSON, or numbers or nesting too large
        raise UserError(f"{source} is not a readable model config: not JSON ({_one_line(err)}); "
                        "give a config.json") from err  # fmt: skip
    check_model_config(values, source)
    return values


def build_config(values: dict[str, Any], source: str) -> PretrainedConfig:
    """transformers' config of checked fields. What transformers itself refuses (a rope_scaling
    it cannot use, a field of its own with a wrong value) is a UserError too."""
    refused = (ValueError, TypeError, KeyError, AttributeError)
    try:
        config = LlamaConfig.from_dict(copy.deepcopy(values))  # MODEL_TYPES
    except refused as err:
        raise UserError(f"{source} is refused by transformers: {_one_line(err)}") from err
    try:
        LlamaRotaryEmbedding(config)  # the rope frequencies, from rope_scaling's settings
    except refused as err:
        raise UserError(f"{source}: rope_scaling is refused by transformers: "
                        f"{_one_line(err)}") from err  # fmt: skip
    return config


def _config_file(spec: str) -> Path:
    path = Path(spec)
    give = f"give a config.json, its directory, or one of: {', '.join(NAMED_SHAPES)}"
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise UserError(f"--config {spec} is a directory with no config.json file ({path} "
                            f"not found); {give}")  # fmt: skip
    if not path.exists():
        raise UserError(f"--config {spec} not found; {give}")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise UserError(f"--config {path} is {kind}; {give}")
    return path


def _shown(value: Any) -> str:
    """A value as the JSON file spells it, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


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


# Each parameter's generator is seeded with seed x SEED_FACTOR + crc32(name): torch takes seeds
# up to 2**64 - 1, so --seed goes up to MAX_SEED (utils/args.py checks it).
SEED_FACTOR = 1_000_003
MAX_SEED = (2**64 - 2**32) // SEED_FACTOR


def _initial_value(owner, name: str, shape: tuple, seed: int, std: float, device) -> torch.Tensor:
    """A module with its own `initial_value` (a sparse layer) initializes its parameters;
    the others follow HF Llama: normal(0, std) matrices, unit norms, zero biases."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * SEED_FACTOR + zlib.crc32(name.encode()))
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
