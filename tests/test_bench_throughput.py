"""The speed path on CPU: the throughput benchmark's smoke mode, its profile summary, and a
compiled run against eager from the same checkpoint."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.profile import is_host_read, kind_of, profile_steps, union_length
from tests.conftest import DATA_CANONICAL_NODES
from tests.helpers import REPO, child_env, logged_losses, tiny_run_flags, train_in_process


def test_benchmark_smoke_on_real_data_prints_json_with_baseline(mds_tokens, tokenizer_dir):
    cmd = [
        sys.executable, "-m", "bench.throughput", "--config=tiny", "--seq_len=64",
        "--local_batch=2", "--accum_steps=2", "--steps=3", "--warmup_steps=1", "--device=cpu",
        "--baseline", "--json", "--peak_tflops=1", "--chunked_loss",
        "--activation_checkpointing=selective", "--profile=1", f"--data_dir={mds_tokens}",
        f"--tokenizer_dir={tokenizer_dir}", "--num_workers=0",
        f"--num_canonical_nodes={DATA_CANONICAL_NODES}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "returned a view tensor" not in proc.stderr  # FSDP2's warning about the chunked head
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for prefix in ("", "baseline_"):
        assert result[f"{prefix}tokens_per_s"] > 0
        assert result[f"{prefix}tflops"] > 0
        assert 0 < result[f"{prefix}mfu"] < 1  # of a 1 TFLOP/s peak
        assert result[f"{prefix}peak_mem_gb"] > 0
        assert 0 <= result[f"{prefix}data_wait_fraction"] < 1
    assert result["tflops"] == pytest.approx(result["mfu"])  # peak 1 TFLOP/s
    assert result["speedup"] == pytest.approx(
        result["tokens_per_s"] / result["baseline_tokens_per_s"]
    )
    assert result["data"] == "mds" and result["chunked_loss"] is True
    assert result["compile"] is False  # the CPU default
    assert "| baseline |" in proc.stdout
    for prefix in ("", "baseline_"):
        profile = result[f"{prefix}profile"]
        assert profile["step_ms"] > 0 and 0 <= profile["uncovered_fraction"] < 1
        assert profile["kinds_ms"]["matmul"] > 0 and profile["kinds_ms"]["attention"] > 0
        assert sum(profile["kinds_ms"].values()) <= profile["step_ms"]
        assert "aten::mm" in dict(profile["top_ms"])
        assert "host_reads_per_step" in profile
    assert "project:" in proc.stdout and "ms per step (profiled)" in proc.stdout


@pytest.mark.parametrize(
    "kernel, kind",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
        ("aten::addmm", "matmul"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
        ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor", "optimizer"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled element-wise"),
        ("Memcpy DtoD (Device -> Device)", "copies"),
        ("void at::native::elementwise_kernel<128, 2, ...>", "other"),
    ],
)  # fmt: skip
def test_profile_sorts_real_kernel_names_into_kinds(kernel, kind):
    assert kind_of(kernel) == kind


@pytest.mark.parametrize(
    "name, read",
    [
        ("Memcpy DtoH (Device -> Pinned)", True),
        ("Memcpy DtoH (Device -> Pageable)", True),
        ("Memcpy HtoD (Pinned -> Device)", False),
        ("Memcpy DtoD (Device -> Device)", False),
    ],
)
def test_profile_counts_copies_back_to_the_host(name, read):
    assert is_host_read(name) == read


def test_busy_time_counts_overlapping_and_nested_kernels_once():
    # a kernel, one inside it (a nested CPU operator), one overlapping it on another stream,
    # then one after a gap
    assert union_length([(0.0, 10.0), (2.0, 5.0), (8.0, 12.0), (20.0, 21.0)]) == 13.0


def test_profile_counts_kernels_not_annotated_ranges():
    x = torch.randn(64, 64)

    def step(micro_batches: list[dict]) -> None:
        with torch.profiler.record_function("host work"):  # as FSDP and the optimizer annotate
            time.sleep(0.05)
            x @ x

    summary = profile_steps(step, itertools.repeat({}), 2, 1, torch.device("cpu"))
    assert summary["uncovered_fraction"] > 0.5  # the sleep is no kernel
    assert "aten::mm" in dict(summary["top_ms"])
    assert "host work" not in dict(summary["top_ms"])


def test_benchmark_bad_input_is_one_line(capsys):
    from bench import throughput

    with pytest.raises(SystemExit) as stop:
        throughput.main(["--config=tiny", "--steps=0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --steps must be positive (got 0)"


def test_compiled_run_matches_eager_resumed_from_its_checkpoint(
    mds_tokens: Path, tokenizer_dir: Path, tmp_path: Path
):
    """Steps 3-4 of a compiled, chunked-loss, selectively checkpointed run equal those of an
    eager run with the plain loss resumed from the compiled run's step 2 checkpoint: the
    compiled model saves under the plain parameter names, and computes the same loss."""
    flags = tiny_run_flags(mds_tokens, tokenizer_dir, tmp_path, steps=4, num_workers=0)
    flags.append("--local_batch=4")
    train_in_process(
        *flags, "--run_name=compiled", "--compile", "--chunked_loss",
        "--activation_checkpointing=selective", "--save_every=2",
    )  # fmt: skip
    compiled = logged_losses(tmp_path / "compiled")
    checkpoint = tmp_path / "compiled" / "step_000002"
    train_in_process(
        *flags, "--run_name=eager", "--no_compile", "--no_chunked_loss",
        f"--resume_dir={checkpoint}",
    )  # fmt: skip
    eager = logged_losses(tmp_path / "eager")
    assert sorted(eager) == [3, 4]
    for step in (3, 4):
        assert eager[step] == pytest.approx(compiled[step], rel=1e-5), (compiled, eager)
    assert compiled[4] < compiled[1]
