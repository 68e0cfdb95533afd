"""lm-eval tasks on the project's model (datas/eval_tasks.py), on local tasks built from test
data (nothing is downloaded): the same answers and metrics as lm-eval's own `hf` model on the
exported model, on 1 rank and sharded over 2, and lm-eval's rolling perplexity against the
project's window perplexity where the two protocols agree."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from bench.rolling_vs_windows import ROLLING_TASK
from datas import eval_tasks
from datas.C4.c4_eval import score_windows
from datas.local_corpus import write_jsonl
from tests.helpers import GLOO_CONNECT_FLAKE, REPO, child_env, torchrun, torchrun_command
from tests.scripts.eval_tasks_dist import (
    NUM_FEWSHOT,
    SEQ_LEN,
    TASKS,
    answer_all,
    cli_args,
    task_requests,
)
from utils.checkpoint.layout import run_seq_len
from utils.errors import UserError
from utils.model import build_meta_model, init_weights, load_model_config

DATA = REPO / "tests/data/eval_tasks"
DIST_SCRIPT = REPO / "tests/scripts/eval_tasks_dist.py"
BATCH_SIZE = 3
MODEL_SEED = 0
REL = 1e-6
N_ROLLING_DOCS = 6
N_WINDOW_DOCS = 5

MC_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {cache}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""


GEN_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {cache}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["e", "\\n"], max_gen_toks: 6, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here while the background launch's 2 ranks hold the 2 cores: threads
    fighting them for the cores make this module's tiny forwards ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a transformers directory with its tokenizer, as an export
    is: what lm-eval's `hf` model loads."""
    model = build_meta_model(load_model_config("tiny", len(tokenizer)), "sdpa")
    init_weights(model, MODEL_SEED, torch.device("cpu"))
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def rolling_documents(docstrings: list[str], tokenizer) -> list[str]:
    """Documents of one window and of several at SEQ_LEN tokens."""
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docstrings]
    short = [d for d, n in zip(docstrings, lengths, strict=True) if 10 < n < SEQ_LEN]
    long = [d for d, n in zip(docstrings, lengths, strict=True) if 2 * SEQ_LEN < n < 4 * SEQ_LEN]
    return short[: N_ROLLING_DOCS // 2] + long[: N_ROLLING_DOCS // 2]


def write_task(directory: Path, name: str, template: str, data: Path) -> None:
    """Task `name` over the JSON-lines file `data`, as `directory/<name>.yaml`; datasets'
    cache stays in the test's temporary directory."""
    cache = directory.parent / "datasets_cache"
    (directory / f"{name}.yaml").write_text(template.format(name=name, data=data, cache=cache))


@pytest.fixture(scope="module")
def task_dir(docstrings, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three kinds of task, as local YAMLs over JSON-lines files."""
    directory = tmp_path_factory.mktemp("tasks") / "tasks"
    directory.mkdir()
    ppl_data = write_jsonl(rolling_documents(docstrings, tokenizer), directory.parent / "ppl.jsonl")
    write_task(directory, "tiny_mc", MC_YAML, DATA / "multiple_choice.jsonl")
    write_task(directory, "tiny_ppl", ROLLING_TASK, ppl_data)
    write_task(directory, "tiny_gen", GEN_YAML, DATA / "generate.jsonl")
    return directory


@pytest.fixture(scope="module")
def requests(task_dir: Path) -> dict[str, list]:
    return task_requests(str(task_dir))


@pytest.fixture(scope="module")
def project_answers(model, tokenizer, requests) -> dict[str, list]:
    lm = eval_tasks.project_lm(
        model, tokenizer, max_length=SEQ_LEN, batch_size=BATCH_SIZE, device=torch.device("cpu")
    )
    with torch.no_grad():
        return answer_all(lm, requests)


@pytest.fixture(scope="module")
def hf_lm(model_dir: Path):
    """lm-eval's own `hf` model on the export, at the run's length (it would otherwise take the
    config's max_position_embeddings)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), max_length=SEQ_LEN, batch_size=BATCH_SIZE, device="cpu")


@pytest.fixture(scope="module")
def cli_metrics(model_dir: Path, task_dir: Path) -> dict:
    return eval_tasks.main(cli_args(str(model_dir), str(task_dir), BATCH_SIZE))


@pytest.fixture(scope="module", autouse=True)
def sharded_run(model_dir: Path, task_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The one torchrun launch (tests/scripts/eval_tasks_dist.py on 2 ranks), started before
    the module's first test so that it runs while the single-rank tests do; the fixture's value
    waits for it and returns what it wrote."""
    work = tmp_path_factory.mktemp("sharded")
    out = work / "result.json"
    args = (str(model_dir), str(task_dir), str(out))
    env = child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")  # nothing may be downloaded
    # Its output goes to a file: a pipe nobody reads yet would stall it once full.
    log = (work / "torchrun.log").open("w")
    launch = subprocess.Popen(
        torchrun_command(DIST_SCRIPT, *args), cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip

    def result() -> dict:
        launch.wait(timeout=300)
        output = (work / "torchrun.log").read_text()
        if launch.returncode != 0 and GLOO_CONNECT_FLAKE in output:
            torchrun(DIST_SCRIPT, *args, env=env)  # gloo's start-up flake: launch once more
        elif launch.returncode != 0:
            raise AssertionError(f"{DIST_SCRIPT.name} failed:\n{output[-8000:]}")
        return json.loads(out.read_text())

    yield result
    if launch.poll() is None:  # the test did not run: stop the launch and its ranks
        os.killpg(launch.pid, signal.SIGKILL)
        launch.wait()
    log.close()


def metric_values(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith("eval/task/")}


def assert_same_metrics(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=REL), key


# ---------------------------------------------------------------- (a) lm-eval's hf model
def test_the_requests_reach_past_the_length_and_stop_strings(requests, tokenizer):
    """The data exercises left truncation, several rolling windows and stop strings."""

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert max(tokens("".join(r.args)) for r in requests["loglikelihood"]) > SEQ_LEN + 1
    assert max(tokens(r.args[0]) for r in requests["loglikelihood_rolling"]) > 2 * SEQ_LEN
    assert min(tokens(r.args[0]) for r in requests["loglikelihood_rolling"]) < SEQ_LEN


def test_every_answer_equals_lm_evals_hf_model(project_answers, hf_lm, requests):
    expected = answer_all(hf_lm, requests)
    for (logprob, greedy), (hf_logprob, hf_greedy) in zip(
        project_answers["loglikelihood"], expected["loglikelihood"], strict=True
    ):
        assert logprob == pytest.approx(hf_logprob, rel=REL)
        assert greedy == hf_greedy
    assert project_answers["loglikelihood_rolling"] == pytest.approx(
        expected["loglikelihood_rolling"], rel=REL
    )
    texts = project_answers["generate_until"]
    assert texts == expected["generate_until"]
    # The stop string "e" is common enough to cut most generations: the cut is exercised.
    assert not any("e" in text for text in texts) and any(texts)


def test_cli_metrics_equal_lm_evals_hf_model(cli_metrics, hf_lm, task_dir, model_dir):
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=hf_lm, tasks=TASKS, num_fewshot=NUM_FEWSHOT, bootstrap_iters=0, log_samples=False,
        task_manager=eval_tasks._task_manager_for(TASKS, str(task_dir)),
    )  # fmt: skip
    expected = eval_tasks.task_metrics(results["results"])
    assert cli_metrics["checkpoint"] == str(model_dir)
    assert cli_metrics["max_length"] == SEQ_LEN
    metrics = metric_values(cli_metrics)
    assert_same_metrics(metrics, expected)
    assert {"eval/task/tiny_mc/acc_norm", "eval/task/tiny_gen/exact_match"} <= set(metrics)
    assert "eval/task/tiny_ppl/bits_per_byte" in metrics


def test_task_metrics_names():
    results = {
        "gsm": {"alias": "gsm", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
        "mc": {"acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 1, "flag,none": True},
    }  # fmt: skip
    assert eval_tasks.task_metrics(results) == {
        "eval/task/gsm/exact_match_strict-match": 0.25,
        "eval/task/mc/acc": 0.5,
        "eval/task/mc/acc_norm": 1.0,
    }


# ---------------------------------------------------------------- (b) 2 ranks == 1 rank
def test_two_sharded_ranks_equal_one(sharded_run, project_answers, cli_metrics):
    result = sharded_run()
    assert result["world_size"] == 2
    assert_same_metrics(metric_values(result["cli"]), metric_values(cli_metrics))
    answers = result["answers"]
    greedy = [[g for _, g in a["loglikelihood"]] for a in (answers, project_answers)]
    assert greedy[0] == greedy[1]
    for kind in ("loglikelihood", "loglikelihood_rolling"):
        got = np.array(answers[kind], dtype=float)
        assert got == pytest.approx(np.array(project_answers[kind], dtype=float), rel=REL)
    assert answers["generate_until"] == project_answers["generate_until"]
    # Odd request counts: a rank ran dummy forwards, so that both ran as many.
    forwards = result["forwards_per_rank"]
    assert forwards[0] == forwards[1] > 0
    assert result["restored"], "evaluate_tasks must restore training mode and the RNG"


# ---------------------------------------------------------------- (c) window perplexity
def exact_token_texts(docstrings: list[str], tokenizer, n_tokens: int, count: int) -> list[str]:
    """Texts of exactly `n_tokens` tokens (a docstring's first tokens, decoded), kept only where
    decoding and encoding again gives the same tokens back."""
    texts = []
    for doc in docstrings:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"][:n_tokens]
        text = tokenizer.decode(ids)
        if len(ids) == n_tokens and tokenizer(text, add_special_tokens=False)["input_ids"] == ids:
            texts.append(text)
        if len(texts) == count:
            return texts
    raise AssertionError("not enough documents")


def test_rolling_perplexity_equals_window_perplexity_where_the_protocols_agree(
    docstrings, tokenizer, tokenizer_dir, model, tmp_path
):
    """With texts D of SEQ_LEN - 2 tokens, the project scores windows [EOS, D, EOS] of exactly
    SEQ_LEN tokens; each predicts D and the final EOS from the leading EOS. lm-eval's rolling
    window of a document `D + EOS` (lm-eval's tokenizer call reads the EOS text as the token;
    SEQ_LEN - 1 tokens, one window) reads the prefix EOS and D and predicts D and EOS: the same
    forward, so the total log-likelihoods agree."""
    texts = exact_token_texts(docstrings[100:], tokenizer, SEQ_LEN - 2, N_WINDOW_DOCS)
    eos = tokenizer.eos_token
    windows = np.array(
        [[tokenizer.eos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"],
          tokenizer.eos_token_id] for t in texts]
    )  # fmt: skip
    score = score_windows(model, windows, batch_size=2)
    ppl, ntokens = score.ppl, score.tokens
    assert ntokens == N_WINDOW_DOCS * (SEQ_LEN - 1)

    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    documents = [t + eos for t in texts]
    data = write_jsonl(documents, tmp_path / "window_docs.jsonl")
    write_task(task_dir, "tiny_windows", ROLLING_TASK, data)
    model.train()
    metrics = eval_tasks.evaluate_tasks(
        model, tokenizer_dir, ["tiny_windows"], seq_len=SEQ_LEN, batch_size=2,
        include_path=str(task_dir),
    )  # fmt: skip
    assert model.training
    model.eval()
    total_bytes = sum(len(d.encode("utf-8")) for d in documents)
    loglikelihood = -math.log(metrics["eval/task/tiny_windows/byte_perplexity"]) * total_bytes
    assert math.exp(-loglikelihood / ntokens) == pytest.approx(ppl, rel=REL)
    bits = metrics["eval/task/tiny_windows/bits_per_byte"]
    assert bits == pytest.approx(-loglikelihood / (total_bytes * math.log(2)), rel=REL)


# ---------------------------------------------------------------- (d) errors
def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_task_names_the_flag_and_close_matches(task_dir, monkeypatch):
    # A name the local YAMLs lack is looked up among lm-eval's 14k built-in tasks, an index
    # that takes ~10 s to build; the local index stands in for it here.
    local_only = eval_tasks._task_manager
    monkeypatch.setattr(eval_tasks, "_task_manager", lambda path, _: local_only(path, False))
    with pytest.raises(UserError) as err:
        eval_tasks.check_tasks(["tiny_mc", "tiny_mcc", "nonsense_xyz"], str(task_dir))
    message = one_line(err)
    assert "--eval_tasks" in message and "'nonsense_xyz'" in message
    assert "'tiny_mcc' (did you mean tiny_mc" in message
    eval_tasks.check_tasks(TASKS, str(task_dir))  # known ones pass


def test_missing_include_dir_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        eval_tasks.check_tasks(["tiny_mc"], str(tmp_path / "nowhere"))
    assert "--eval_tasks_include" in one_line(err)


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch, model):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails
    for call in (
        lambda: eval_tasks.check_tasks(["hellaswag"], None),
        lambda: eval_tasks.evaluate_tasks(model, None, ["hellaswag"], seq_len=8, batch_size=1),
    ):
        with pytest.raises(UserError) as err:
            call()
        assert "pip install '.[eval]'" in one_line(err)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"seq_len": 1}, "seq_len=1: give at least 2"),
        ({"batch_size": 0}, "batch_size=0: give at least 1"),
        ({"limit": 0}, "limit=0: give at least 1"),
    ],
)
def test_a_bad_setting_is_named_before_any_task_runs(settings, expected, model, tokenizer):
    settings = {"seq_len": 8, "batch_size": 1, "limit": None} | settings
    with pytest.raises(UserError) as err:
        eval_tasks.evaluate_tasks(model, tokenizer, ["no_such_task"], **settings)
    assert expected in one_line(err)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "error: --checkpoint {tmp}/missing does not exist"),
        ("run_dir", "error: --checkpoint {tmp}/run is a run directory holding step_000001"),
        ("limit", "error: --limit 0: give at least 1"),
    ],
)
def test_cli_mistakes_are_one_line(case, expected, task_dir, tmp_path, capsys):
    (tmp_path / "run" / "step_000001").mkdir(parents=True)
    checkpoint = tmp_path / ("run" if case == "run_dir" else "missing")
    extra = ["--limit", "0"] if case == "limit" else []
    with pytest.raises(SystemExit) as exit_info:
        eval_tasks.main(["--checkpoint", str(checkpoint), "--tasks", "tiny_mc",
                         "--include_path", str(task_dir), *extra])  # fmt: skip
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith(expected.format(tmp=tmp_path)) and "\n" not in stderr


def test_evaluation_is_seeded_and_leaves_the_generators_alone(model, tokenizer, task_dir):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = eval_tasks.evaluate_tasks(
        model, tokenizer, ["tiny_gen"], seq_len=SEQ_LEN, batch_size=4,
        include_path=str(task_dir), num_fewshot=2,
    )  # fmt: skip
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])
    second = eval_tasks.evaluate_tasks(
        model, tokenizer, ["tiny_gen"], seq_len=SEQ_LEN, batch_size=1,
        include_path=str(task_dir), num_fewshot=2,
    )  # fmt: skip
    assert first == second


def test_max_length_defaults_to_the_runs_seq_len_else_the_config(model_dir, model, capsys):
    flags = eval_tasks.parse_args(["--checkpoint", str(model_dir), "--tasks", "tiny_mc"])
    assert run_seq_len(model_dir) is None  # a model from elsewhere: no record
    assert eval_tasks._max_length(flags, 48, model.config, main=True) == 48
    assert capsys.readouterr().out == ""
    fallback = eval_tasks._max_length(flags, None, model.config, main=True)
    assert fallback == model.config.max_position_embeddings
    assert "note:" in capsys.readouterr().out


def test_a_max_length_beyond_the_models_positions_is_one_line(model_dir, model, capsys):
    limit = model.config.max_position_embeddings
    for max_length in (limit, limit + 1, 4 * limit):
        flags = eval_tasks.parse_args(["--checkpoint", str(model_dir), "--tasks", "tiny_mc",
                                       "--max_length", str(max_length)])  # fmt: skip
        if max_length == limit:
            assert eval_tasks._max_length(flags, 48, model.config, main=True) == limit
            continue
        with pytest.raises(UserError) as err:
            eval_tasks._max_length(flags, 48, model.config, main=True)
        assert one_line(err).startswith(
            f"--max_length {max_length} exceeds the model's max_position_embeddings {limit}"
        )


def test_the_rolling_vs_windows_benchmark_agrees_where_the_protocols_do(
    model_dir, docstrings, tmp_path
):
    """bench/rolling_vs_windows.py, whose numbers docs/downstream.md quotes."""
    from bench import rolling_vs_windows

    data = write_jsonl(docstrings[:60], tmp_path / "eval" / "docs.jsonl")
    result = rolling_vs_windows.main(
        ["--checkpoint", str(model_dir), "--data", str(data), "--seq_len", str(SEQ_LEN)]
    )
    aligned = result["aligned"]
    assert aligned["count"] > 0 and aligned["scored_tokens"] == aligned["count"] * (SEQ_LEN - 1)
    assert aligned["rolling_ppl"] == pytest.approx(aligned["window_ppl"], rel=REL)
    documents = result["documents"]
    assert documents["count"] == 60 and documents["rolling_ppl"] != documents["window_ppl"]
