"""--document_masking: the loader's position_ids make each packed document attend only to
itself, through train.py's own model inputs and loss."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import train
from datas.SmolLM.load_data import build_train_loader
from tests.conftest import DATA_CANONICAL_NODES
from utils import attention
from utils.errors import UserError
from utils.loss import model_nll_sum, next_token_nll_sum
from utils.model import load_model_config


def test_packed_documents_see_only_themselves(mds_text, tokenizer_dir):
    loader = build_train_loader(
        mds_root=str(mds_text), tokenizer_name=str(tokenizer_dir), seq_len=128, micro_blocks=2,
        num_workers=0, num_canonical_nodes=DATA_CANONICAL_NODES, world_size=1, global_rank=0,
        emit_position_ids=True,
    )  # fmt: skip
    batch = next(iter(loader))
    torch.manual_seed(0)
    config = load_model_config("tiny", loader.vocab_size)
    config.initializer_range = 0.2  # sharper attention than an untrained 0.02 model's
    implementation = attention.attention_implementation(
        attention.AttentionFlags(document_masking=True)
    )  # as train.py picks it
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    row = {key: value[:1] for key, value in batch.items()}
    starts = (row["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2 and starts[0] == 0  # several documents share the row
    documents = row["input_ids"].tensor_split(starts[1:], dim=1)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=document).logits for document in documents], dim=1)
        expected = next_token_nll_sum(alone, row["labels"])
        inputs = train.model_inputs(row, torch.device("cpu"), implementation)
        masked = model_nll_sum(model, inputs, row["labels"])
        unmasked = model_nll_sum(model, {"input_ids": row["input_ids"]}, row["labels"])
    assert masked == pytest.approx(float(expected), rel=1e-6)
    assert unmasked != pytest.approx(float(expected), rel=1e-3)


def test_flash_attn_gets_the_document_boundaries_of_the_whole_micro_batch(monkeypatch):
    """transformers finds documents from position ids for a one-row micro-batch only, so train.py
    hands flash-attn's variable-length kernel the boundaries itself; they reach every layer."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    inputs = train.model_inputs(
        {"input_ids": torch.arange(10).view(2, 5), "position_ids": position_ids},
        torch.device("cpu"),
        "flash_attention_2",
    )
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10]
    assert inputs["cu_seq_lens_q"].dtype == torch.int32 and inputs["max_length_q"] == 3
    assert "cu_seq_lens_q" not in train.model_inputs(
        {"input_ids": position_ids, "position_ids": position_ids}, torch.device("cpu"), "sdpa"
    )

    seen = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        seen.append((kwargs["cu_seq_lens_k"].tolist(), kwargs["max_length_k"]))
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("recording_attention", recording_attention)
    monkeypatch.setattr(attention, "FLASH_IMPLEMENTATIONS", ("recording_attention",))
    model = AutoModelForCausalLM.from_config(
        load_model_config("tiny", 0), attn_implementation="recording_attention"
    )
    batch = {"input_ids": position_ids + 5, "position_ids": position_ids}
    with torch.no_grad():
        model_nll_sum(
            model,
            train.model_inputs(batch, torch.device("cpu"), "recording_attention"),
            batch["input_ids"],
        )
    assert seen == [([0, 3, 5, 7, 10], 3)] * model.config.num_hidden_layers


def test_document_masking_needs_packing():
    args = Namespace(document_masking=True, strategy="trunc")
    with pytest.raises(UserError, match="--document_masking needs --strategy pack"):
        train.build_loader(args, env=None)
