"""slt layers against explicit formulas, the schedule, the config checks, and export; in-process
on CPU. Training runs with slt (world sizes, resume) are in test_slt_training.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from slt import (
    METHOD_DEFAULTS,
    MagnitudeLinear,
    NMLinear,
    SLTConfig,
    SLTrainLinear,
    SparseTraining,
    SupermaskLinear,
    load_slt_config,
    nm_mask,
    scheduled_sparsity,
)
from slt.schedule import last_refresh, refresh_due
from utils.args import parse_args
from utils.distributed import build_mesh
from utils.errors import UserError
from utils.model import build_meta_model, init_weights, load_model_config
from utils.optim import build_optimizer
from utils.parallelize import parallelize_model

IN, OUT = 24, 16


def materialized(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Parameters set by the layer's own initialization, as training does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(layer.initial_value(name, generator, 0.02))
    layer.reset_buffers()
    return layer


def forward_backward(layer: nn.Module, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and the upstream gradient g = dL/dy of L = sum(y * g)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, IN, generator=generator)
    g = torch.randn(5, OUT, generator=generator)
    y = layer(x)
    (y * g).sum().backward()
    return x, g, y


def grad_of_weight(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dL/dW of L = sum((x @ W.T) * g): what reaches the effective weight."""
    return g.T @ x


def test_magnitude_masks_smallest_and_passes_gradient_straight_through():
    layer = materialized(MagnitudeLinear(IN, OUT, bias=False))
    layer.refresh_threshold(0.25, torch.float32)
    x, g, y = forward_backward(layer)
    w = layer.weight.detach()
    kept = w.abs() > w.abs().flatten().kthvalue(round(0.25 * w.numel())).values
    assert int((~kept).sum()) == round(0.25 * w.numel())
    torch.testing.assert_close(y, x @ (w * kept).T)
    torch.testing.assert_close(layer.weight.grad, grad_of_weight(x, g))  # pruned ones too


@pytest.mark.parametrize("weight_init", ["signed_constant", "kaiming"])
def test_supermask_keeps_top_scores_and_trains_only_scores(weight_init):
    layer = materialized(
        SupermaskLinear(IN, OUT, False, weight_init=weight_init, score_init="kaiming_uniform")
    )
    layer.refresh_threshold(0.5, torch.float32)
    x, g, y = forward_backward(layer)
    w, s = layer.weight.detach(), layer.scores.detach()
    kept = s.abs() > s.abs().flatten().kthvalue(s.numel() // 2).values
    torch.testing.assert_close(y, x @ (w * kept).T)
    torch.testing.assert_close(layer.scores.grad, grad_of_weight(x, g) * w)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    if weight_init == "signed_constant":
        assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / IN)))


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_nm_keeps_n_largest_per_group_and_decays_pruned_entries_once(decay):
    layer = materialized(NMLinear(IN, OUT, False, n=2, m=4, srste_lambda=decay))
    x, g, y = forward_backward(layer)
    w = layer.weight.detach()
    groups = w.abs().reshape(OUT, IN // 4, 4)
    smallest_kept = groups.topk(2, dim=-1).values[..., -1:]
    kept = (groups >= smallest_kept).reshape(OUT, IN)
    assert (kept.reshape(OUT, -1, 4).sum(-1) == 2).all()
    torch.testing.assert_close(y, x @ (w * kept).T)
    torch.testing.assert_close(layer.weight.grad, grad_of_weight(x, g))  # straight through
    layer.add_decay_gradient(torch.float32)
    torch.testing.assert_close(layer.weight.grad, grad_of_weight(x, g) + decay * w * ~kept)


def test_nm_mask_groups_run_along_the_input_dimension():
    weight = torch.tensor([[1.0, -5.0, 3.0, 0.5, 9.0, 8.0, -7.0, 0.1]])
    expected = torch.tensor([[False, True, True, False, True, True, False, False]])
    assert torch.equal(nm_mask(weight, 2, 4), expected)


def test_nm_mask_keeps_the_earlier_of_equal_magnitudes():
    weight = torch.tensor([[2.0, -2.0, 2.0, 1.0, 0.5, 3.0, -0.5, 0.5]])
    expected = torch.tensor([[True, True, False, False, True, True, False, False]])
    assert torch.equal(nm_mask(weight, 2, 4), expected)


def test_sltrain_is_scaled_low_rank_plus_sparse():
    layer = materialized(SLTrainLinear(IN, OUT, False, r=3, alpha=6.0, delta=0.25))
    with torch.no_grad():
        layer.lora_B.normal_()  # zero at init; made non-zero so both factors get gradients
    x, g, y = forward_backward(layer)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    values, columns = layer.sparse_values.detach(), layer.sparse_columns.long()
    sparse = torch.zeros(OUT, IN).scatter(1, columns, values)
    torch.testing.assert_close(y, x @ (2.0 * b @ a + sparse).T)
    grad_w = grad_of_weight(x, g)
    torch.testing.assert_close(layer.lora_B.grad, 2.0 * grad_w @ a.T)
    torch.testing.assert_close(layer.lora_A.grad, 2.0 * b.T @ grad_w)
    torch.testing.assert_close(layer.sparse_values.grad, grad_w.gather(1, columns))


def test_sltrain_init_zero_b_and_distinct_random_columns_per_row():
    layer = materialized(SLTrainLinear(IN, OUT, False, r=3, alpha=6.0, delta=0.25))
    assert not layer.lora_B.any()
    columns = layer.sparse_columns
    assert columns.shape == (OUT, 6) and columns.dtype == torch.int32
    assert all(len(set(row.tolist())) == 6 for row in columns)
    assert len({tuple(row.tolist()) for row in columns}) > 1  # rows differ


def llama(hidden: int = 64, layers: int = 2) -> nn.Module:
    config = load_model_config("tiny", tokenizer_vocab=0)
    config.hidden_size, config.num_hidden_layers = hidden, layers
    return build_meta_model(config, "sdpa")


def test_sltrain_parameter_count_formula():
    """Per projection r * (in + out) low-rank values and out * round(delta * in) sparse ones,
    at r 8 and delta 0.03 in the tiny shape (hidden 64, FFN 176, KV 32): q and o 1,152, k and
    v 832, gate and up 2,272, down 2,240; 10,752 a layer, 21,504 for both."""
    sparse = SparseTraining(llama(), SLTConfig.from_dict({"method": "sltrain", "r": 8}))
    assert sparse.trainable_parameters() == 21_504
    assert "0.02M parameters" in sparse.describe()


def test_patch_replaces_only_targets_and_keeps_embeddings_and_head_dense():
    model = llama()
    config = SLTConfig.from_dict({"method": "magnitude", "targets": ["q_proj", "down_proj"]})
    sparse = SparseTraining(model, config)
    assert sorted(sparse.layers) == [
        f"model.layers.{i}.{p}" for i in range(2) for p in ("mlp.down_proj", "self_attn.q_proj")
    ]
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        ("cubic", 0, 0.1),
        ("cubic", 10, 0.1),
        ("cubic", 60, 0.9 + (0.1 - 0.9) * 0.5**3),
        ("cubic", 85, 0.9 + (0.1 - 0.9) * 0.25**3),
        ("cubic", 110, 0.9),
        ("cubic", 500, 0.9),
        ("linear", 60, 0.5),
        ("constant", 1, 0.9),
    ],
)
def test_schedule_density(kind, step, expected):
    settings = METHOD_DEFAULTS["magnitude"] | {
        "initial_sparsity": 0.1,
        "final_sparsity": 0.9,
        "start_step": 10,
        "end_step": 110,
        "schedule": kind,
    }
    assert scheduled_sparsity(step, settings) == pytest.approx(expected)


def test_refresh_steps():
    settings = {"update_every": 3}
    assert [s for s in range(1, 11) if refresh_due(s, settings)] == [1, 4, 7, 10]
    assert [last_refresh(s, settings) for s in range(1, 8)] == [1, 1, 1, 4, 4, 4, 7]


def test_measured_sparsity_follows_the_schedule_during_training(tmp_path):
    """Thresholds come from the full weights at each refresh; the measured sparsity of the
    effective weights equals the scheduled one right after it (world of one, no FSDP)."""

    from utils.distributed import init_distributed, shutdown

    init_distributed()
    try:
        model = llama()
        config = {"method": "magnitude", "end_step": 4, "update_every": 2, "final_sparsity": 0.6}
        sparse = SparseTraining(model, SLTConfig.from_dict(config))
        init_weights(model, seed=0, device=torch.device("cpu"))
        for step in (1, 2, 3, 4, 5):
            sparse.before_step(step)
            model(input_ids=torch.tensor([[1, 2, 3]]))
            measured = sparse.measure(step)
            settings = sparse.config.settings
            target = scheduled_sparsity(last_refresh(step, settings), settings)
            assert measured["sparsity"] == pytest.approx(target, abs=2e-3), step
            assert measured["slt/target_sparsity"] == pytest.approx(target)
    finally:
        shutdown()


def test_export_gives_effective_weights_and_keeps_the_sparse_layers_own_tensors():
    model = llama()
    config = SLTConfig.from_dict({"method": "nm", "n": 1, "m": 4})
    sparse = SparseTraining(model, config)
    init_weights(model, seed=3, device=torch.device("cpu"))
    full = {k: v.detach() for k, v in model.state_dict().items()}
    dense, own = sparse.export_weights(full)
    q = "model.layers.0.self_attn.q_proj.weight"
    expected = full[q] * nm_mask(full[q], 1, 4)
    assert torch.equal(dense[q], expected) and (dense[q] == 0).float().mean() == 0.75
    assert dense.keys() == full.keys()  # N:M keeps the dense names; its `weight` is masked
    assert own.keys() == {f"{name}.weight" for name in sparse.layers}
    assert all(torch.equal(own[k], full[k]) for k in own)  # unmasked: training resumes from it


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"method": "dense"}, "method must be one of"),
        ({"method": "magnitude", "sparsity": 0.5}, "unknown keys ['sparsity']"),
        ({"method": "nm", "final_sparsity": 0.5}, "unknown keys ['final_sparsity']"),
        ({"method": "magnitude", "final_sparsity": 1.0}, "final_sparsity must be a number in"),
        ({"method": "magnitude", "schedule": "exp"}, "schedule must be one of"),
        ({"method": "magnitude", "update_every": 0}, "update_every must be an integer >= 1"),
        ({"method": "magnitude", "start_step": 50, "end_step": 50}, "end_step must be greater"),
        ({"method": "supermask", "weight_init": "xavier"}, "weight_init must be"),
        ({"method": "supermask", "score_init": "zeros"}, "score_init must be"),
        ({"method": "nm", "n": 4, "m": 4}, "n must be smaller than m"),
        ({"method": "nm", "srste_lambda": -1}, "srste_lambda must be"),
        ({"method": "sltrain", "delta": 0}, "delta must be a number in (0, 1]"),
        ({"method": "sltrain", "r": 2.5}, "r must be an integer"),
        ({"method": "sltrain", "alpha": 0}, "alpha must be a number > 0"),
        ({"method": "sltrain", "targets": ["lm_head"]}, "targets must be a non-empty list"),
        ({"method": "sltrain", "targets": []}, "targets must be a non-empty list"),
    ],
)
def test_config_errors(tmp_path, values, message):
    path = tmp_path / "slt.json"
    path.write_text(json.dumps(values))
    with pytest.raises(UserError, match=r"--slt_config .*slt\.json: ") as err:
        load_slt_config(str(path))
    assert message in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_slt_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{method: nm")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_slt_config(str(tmp_path / "bad.json"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"method": "nm", "m": 5}, "in_features divisible by m=5"),
        ({"method": "sltrain"}, "sltrain r=128 is not below"),  # the paper's r for this size
    ],
)
def test_config_errors_that_need_the_model(values, message):
    with pytest.raises(UserError, match=message):
        SparseTraining(llama(), SLTConfig.from_dict(values))


def test_defaults_fill_every_key():
    config = SLTConfig.from_dict({"method": "supermask"})
    assert config.to_dict() == {"method": "supermask", "targets": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]} | METHOD_DEFAULTS["supermask"]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--enable_slt"], "go together"), (["--slt_config=x.json"], "go together")],
)
def test_slt_flags_go_together(tmp_path, flags, message):
    base = ["--data_dir=d", f"--tokenizer_dir={tmp_path}", "--config=tiny"]
    with pytest.raises(UserError, match=message):
        parse_args([*base, f"--output_dir={tmp_path}", *flags])


def sharded_sparse_llama(env, slt: dict, **layout) -> tuple[nn.Module, SparseTraining]:
    """The tiny Llama with `slt` applied, sharded over all ranks and initialized."""
    model = build_meta_model(load_model_config("tiny", 0), "sdpa")
    sparse = SparseTraining(model, SLTConfig.from_dict(slt))
    parallelize_model(
        model, build_mesh(env, "full_shard"), sharding_strategy="full_shard",
        param_dtype=torch.float32, **layout,
    )  # fmt: skip
    init_weights(model, seed=0, device=env.device)
    return model, sparse


def losses_on_a_fixed_batch(model: nn.Module, sparse: SparseTraining, steps: int = 3) -> list:
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    batch = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(1, steps + 1):
        sparse.before_step(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_thresholded_training_under_compile_and_selective_checkpointing_matches_eager():
    """Mask refreshes happen between steps, so a compiled, checkpointed layer saves the same
    tensors in forward and in its recomputation, and the losses are eager's."""
    from utils.distributed import init_distributed, shutdown

    env = init_distributed()
    try:
        losses = []
        for fast in (False, True):
            layout = {"activation_checkpointing": "selective", "compile": True} if fast else {}
            model, sparse = sharded_sparse_llama(env, {"method": "supermask"}, **layout)
            losses.append(losses_on_a_fixed_batch(model, sparse))
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    finally:
        shutdown()
