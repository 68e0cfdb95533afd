"""`--init_from`: a run starts from a transformers model directory (safetensors or .bin) or
from one of this project's checkpoints. The step-0 evaluation must give the perplexity the eval
CLI gives the directory it started from; refusals are in test_bad_input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from datas import eval_sets
from datas.C4.c4_eval import evaluate_c4_ppl
from datas.local_corpus import write_c4_validation
from tests.helpers import metrics_records, tiny_run_flags, torchrun_runs, train_in_process
from utils.model import load_model_config

MAX_WINDOWS = 8
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def eval_flags(c4: Path) -> list[str]:
    return ["--eval_every=1", f"--eval_data={c4}", f"--eval_max_windows={MAX_WINDOWS}"]


def first_eval(run_dir: Path) -> dict:
    return next(r for r in metrics_records(run_dir) if "eval/c4_ppl" in r)


@pytest.fixture(scope="module")
def c4(tmp_path_factory, docstrings) -> Path:
    return write_c4_validation(docstrings[-60:], tmp_path_factory.mktemp("c4"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """The same random tiny Llama saved by transformers twice: as safetensors and as .bin."""
    root = tmp_path_factory.mktemp("pretrained")
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    torch.manual_seed(123)
    model = LlamaForCausalLM(load_model_config("tiny", vocab))
    model.save_pretrained(str(root / "safetensors"), safe_serialization=True)
    model.save_pretrained(str(root / "bin"), safe_serialization=False)
    return {"safetensors": root / "safetensors", "bin": root / "bin", "model": model}


def pruned_by_magnitude(model: LlamaForCausalLM, sparsity: float) -> LlamaForCausalLM:
    """A copy with the smallest-|w| share of each projection's entries set to zero."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in pruned.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                magnitude = module.weight.abs()
                cut = magnitude.flatten().kthvalue(round(sparsity * magnitude.numel())).values
                module.weight[magnitude <= cut] = 0
    return pruned


def test_a_run_starts_from_a_transformers_directory(
    pretrained, c4, mds_tokens, tokenizer_dir, tmp_path
):
    """Two ranks (each reads only its rows), both file formats; a pretrained model pruned by
    magnitude (its masks come from the loaded weights) and given a supermask (its scores are
    its own: the files hold none)."""
    slt = {
        "magnitude": {"method": "magnitude", "final_sparsity": 0.5, "schedule": "constant"},
        "supermask": {"method": "supermask", "final_sparsity": 0.5},
    }
    for method, settings in slt.items():
        (tmp_path / f"{method}.json").write_text(json.dumps(settings))
    runs = {
        "from_safetensors": [],
        "from_bin": [],
        **{m: ["--enable_slt", f"--slt_config={tmp_path / m}.json"] for m in slt},
    }
    source = {name: "bin" if name == "from_bin" else "safetensors" for name in runs}
    torchrun_runs(
        [
            tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=1, num_workers=0)
            + [f"--run_name={name}", "--local_batch=4", f"--init_from={pretrained[source[name]]}",
               f"--config={pretrained[source[name]]}", *eval_flags(c4), *extra]
            for name, extra in runs.items()
        ],
        tmp_path,
    )  # fmt: skip
    expected = eval_sets.main([
        f"--checkpoint={pretrained['safetensors']}", f"--data={c4}", f"--tokenizer={tokenizer_dir}",
        "--seq_len=64", f"--max_windows={MAX_WINDOWS}",
    ])["eval/c4_ppl"]  # fmt: skip
    for name in ("from_safetensors", "from_bin"):
        record = first_eval(tmp_path / name)
        assert record["step"] == 0 and record["tokens_seen"] == 0
        assert record["eval/c4_ppl"] == pytest.approx(expected, rel=1e-5)
    step_1 = [
        next(r for r in metrics_records(tmp_path / name) if "loss" in r)
        for name in ("from_safetensors", "from_bin")
    ]
    assert step_1[0]["loss"] == pytest.approx(step_1[1]["loss"], rel=1e-6)
    assert first_eval(tmp_path / "supermask")["step"] == 0
    pruned, _ = evaluate_c4_ppl(
        pruned_by_magnitude(pretrained["model"], 0.5), str(tokenizer_dir), c4, seq_len=64,
        max_windows=MAX_WINDOWS,
    )  # fmt: skip
    assert pruned != pytest.approx(expected, rel=1e-4)
    assert first_eval(tmp_path / "magnitude")["eval/c4_ppl"] == pytest.approx(pruned, rel=1e-5)


def test_a_run_starts_from_a_checkpoint_with_a_fresh_schedule(
    c4, mds_tokens, tokenizer_dir, tmp_path
):
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=2, num_workers=0)
    flags += ["--local_batch=8", *eval_flags(c4)]
    train_in_process(*flags, "--run_name=first", "--save_every=2")
    step_2 = tmp_path / "first" / "step_000002"
    train_in_process(*flags, "--run_name=second", f"--init_from={step_2}")
    first = [r for r in metrics_records(tmp_path / "first") if "eval/c4_ppl" in r]
    second = metrics_records(tmp_path / "second")
    assert first_eval(tmp_path / "second")["eval/c4_ppl"] == pytest.approx(
        first[-1]["eval/c4_ppl"], rel=1e-6
    )
    first_step = next(r for r in second if "loss" in r)
    assert first_step["step"] == 1 and first_step["tokens_seen"] == 8 * 64
    assert first_step["lr"] == pytest.approx(next(
        r["lr"] for r in metrics_records(tmp_path / "first") if "loss" in r
    ))  # fmt: skip
