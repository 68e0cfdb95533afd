"""The loss (utils/loss.py): which tokens count, and the chunked head against the plain one."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils import loss as loss_module
from utils.loss import (
    IGNORE_INDEX,
    ChunkedLossHead,
    chunked_next_token_nll_sum,
    model_nll_sum,
    next_token_nll_sum,
    predicted_token_count,
    use_chunked_loss,
)
from utils.model import load_model_config


def test_only_shifted_labels_that_are_not_ignored_count():
    """Position t predicts label t + 1: the first label of a row is never a target."""
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, 1, 2, IGNORE_INDEX]])
    assert predicted_token_count(labels) == 4


def random_case(vocab: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 41, 16, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=generator, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 41), generator=generator)
    labels[1, 5:30] = IGNORE_INDEX  # padding carries no loss
    return hidden, weight, labels


def loss_and_grads(loss_fn, hidden, weight, labels):
    loss = loss_fn(hidden, weight, labels)
    hidden.grad = weight.grad = None
    (loss * 0.37).backward()  # train_step scales the summed loss
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def test_chunked_loss_equals_plain_loss_and_gradients(monkeypatch):
    vocab = 300
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 17 * vocab)  # 7 chunks, the last partial
    hidden, weight, labels = random_case(vocab)
    plain = loss_and_grads(lambda h, w, y: next_token_nll_sum(h @ w.T, y), hidden, weight, labels)
    chunked = loss_and_grads(chunked_next_token_nll_sum, hidden, weight, labels)
    assert chunked[0].dtype == torch.float32
    assert chunked[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    for got, want in zip(chunked[1:], plain[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_head_keeps_names_and_logits_and_gives_the_models_loss():
    config = load_model_config("tiny", tokenizer_vocab=0)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config)
    chunked = AutoModelForCausalLM.from_config(config)
    chunked.load_state_dict(plain.state_dict())
    use_chunked_loss(chunked, compile_chunks=False)
    assert isinstance(chunked.get_output_embeddings(), ChunkedLossHead)
    assert list(chunked.state_dict()) == list(plain.state_dict())
    input_ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():  # outside training it is an ordinary output layer (C4 eval, export)
        torch.testing.assert_close(
            chunked(input_ids=input_ids).logits, plain(input_ids=input_ids).logits
        )
    want = model_nll_sum(plain, {"input_ids": input_ids}, input_ids)
    got = model_nll_sum(chunked, {"input_ids": input_ids}, input_ids)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    want.backward()
    got.backward()
    torch.testing.assert_close(
        chunked.lm_head.weight.grad, plain.lm_head.weight.grad, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        chunked.model.embed_tokens.weight.grad,
        plain.model.embed_tokens.weight.grad,
        rtol=1e-5,
        atol=1e-6,
    )
