"""`python generate.py` on real checkpoints of tiny runs trained in this process, and the record
of its training that an export carries (`training.json`, `utils.checkpoint.training_record`).

The runs train 2 steps at a learning rate of 1e-4, so the model stays near its random init,
where the most likely next token changes with any change of the weights: greedy text that
agrees across formats says the weights agree, and a sparse run's differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import generate as generate_cli
from convert import convert
from generate import Decoding, generate
from tests.helpers import tiny_run_flags, train_in_process
from utils.checkpoint import TRAINING_RECORD, training_record
from utils.errors import UserError
from utils.model import load_model_config

PROMPT = "Return the"
NEW_TOKENS = 12
SEQ_LEN = 64  # tiny_run_flags' --seq_len
NM_1_4 = {"method": "nm", "n": 1, "m": 4}
# generate() reads a `shard` checkpoint with DCP outside a process group, which it warns about
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generate")


@pytest.fixture(scope="module")
def steps(out, mds_tokens, tokenizer_dir) -> dict[str, Path]:
    """Step 2 of: one dense run saved as `shard`, the same run saved as `full`, and a 1:4 N:M
    sparse run saved as `local`; the `shard` and sparse ones exported."""
    (out / "nm.json").write_text(json.dumps(NM_1_4))
    runs = {
        "shard": ["--ckpt_type=shard"],
        "full": ["--ckpt_type=full"],
        "sparse": ["--ckpt_type=local", "--enable_slt", f"--slt_config={out / 'nm.json'}"],
    }
    found = {}
    for name, extra in runs.items():
        flags = tiny_run_flags(mds_tokens, tokenizer_dir, out, steps=2, num_workers=0)
        train_in_process(*flags, "--local_batch=8", "--lr=1e-4", "--min_lr=1e-5", "--warmup=1",
                         "--save_every=2", f"--run_name={name}", *extra)  # fmt: skip
        found[name] = out / name / "step_000002"
    for name in ("shard", "sparse"):
        found[f"{name} export"] = convert(found[name], out / f"{name}_export")
    return found


@pytest.fixture(scope="module")
def text(steps) -> str:
    """The greedy continuation of PROMPT by the `shard` checkpoint."""
    return greedy(steps["shard"])


@pytest.fixture(scope="module")
def elsewhere(out, tokenizer_dir) -> Path:
    """A transformers directory not made by this project: a random tiny Llama of 16 positions
    and the suite's tokenizer, saved by save_pretrained."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = load_model_config("tiny", len(tokenizer))
    config.max_position_embeddings = 16
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out / "elsewhere"))
    tokenizer.save_pretrained(str(out / "elsewhere"))
    return out / "elsewhere"


def greedy(directory: Path, prompt: str = PROMPT, tokens: int = NEW_TOKENS) -> str:
    return generate(directory, prompt, Decoding(max_new_tokens=tokens))[0]


def error_line(argv: list[str], capsys) -> str:
    """generate.py's main on `argv`: status 2 and one `error:` line on stderr, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        generate_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------- sampling
def test_greedy_text_is_the_same_from_every_format_of_a_run(steps, text):
    """shard, full and the export give one text, the text transformers' own generate gives the
    export as docs/checkpoints.md says to call it; the sparse run's text is another."""
    assert text.strip(), "nothing generated: the comparison would tell nothing"
    assert greedy(steps["full"]) == text
    assert greedy(steps["shard export"]) == text
    model = AutoModelForCausalLM.from_pretrained(str(steps["shard export"]))
    tokenizer = AutoTokenizer.from_pretrained(str(steps["shard export"]))
    inputs = tokenizer(PROMPT, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT + text
    assert greedy(steps["sparse"]) != text


def test_a_sparse_checkpoint_generates_its_exports_text(steps):
    assert greedy(steps["sparse"]) == greedy(steps["sparse export"])


def test_sampling_with_a_seed_is_reproducible(steps):
    def samples(seed: int) -> list[str]:
        decoding = Decoding(NEW_TOKENS, temperature=1.0, top_p=0.95, seed=seed, num_samples=2)
        return generate(steps["shard"], PROMPT, decoding)

    first = samples(7)
    assert len(first) == 2 and first[0] != first[1]
    assert samples(7) == first
    assert samples(8) != first


def test_top_p_keeps_the_most_likely_token_only_when_tiny(steps, text):
    """Top-p keeps the most likely tokens up to p of the mass, and always one: a tiny p at a
    temperature of 1 is greedy, where the whole distribution is not."""
    tiny_p = Decoding(NEW_TOKENS, temperature=1.0, top_p=1e-6, seed=1)
    whole = Decoding(NEW_TOKENS, temperature=1.0, top_p=1.0, seed=1)
    assert generate(steps["shard"], PROMPT, tiny_p) == [text]
    assert generate(steps["shard"], PROMPT, whole) != [text]


def test_the_command_prints_the_prompt_and_its_continuation(steps, text, capsys):
    capsys.readouterr()
    argv = [f"--checkpoint={steps['full']}", f"--prompt={PROMPT}", f"--max_new_tokens={NEW_TOKENS}"]
    generate_cli.main(argv)
    captured = capsys.readouterr()
    assert captured.out == f"{PROMPT}{text}\n" and captured.err == ""
    generate_cli.main([*argv, "--temperature=1", "--seed=3", "--num_samples=2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "--- sample 1 of 2 ---" and "--- sample 2 of 2 ---" in lines


def test_past_the_trained_length_warns_and_still_generates(steps, elsewhere, capsys):
    """The run trained at 64 tokens; a model from elsewhere is held to its config's
    max_position_embeddings (16)."""
    capsys.readouterr()
    assert generate(steps["shard export"], PROMPT, Decoding(max_new_tokens=SEQ_LEN))[0]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "past the model's 64" in err[0]
    assert greedy(steps["shard export"]) and capsys.readouterr().err == ""
    assert generate(elsewhere, PROMPT, Decoding(max_new_tokens=16))[0]
    err = capsys.readouterr().err
    assert "past the model's 16, its config's max_position_embeddings" in err


BAD_FLAGS = {
    "no new tokens": (["--max_new_tokens=0"], "--max_new_tokens must be at least 1"),
    "negative temperature": (["--temperature=-0.5"], "--temperature must be 0"),
    "temperature nan": (["--temperature=nan"], "--temperature must be 0"),
    "temperature inf": (["--temperature=inf"], "--temperature must be 0"),
    "top_p 0": (["--temperature=1", "--top_p=0"], "--top_p must be in (0, 1]"),
    "top_p above 1": (["--temperature=1", "--top_p=1.5"], "--top_p must be in (0, 1]"),
    "top_p when greedy": (["--top_p=0.9"], "--top_p 0.9 applies to sampling only"),
    "samples when greedy": (["--num_samples=3"], "gives the same greedy text each time"),
    "no samples": (["--temperature=1", "--num_samples=0"], "--num_samples must be at least 1"),
    "negative seed": (["--seed=-1"], "--seed must be from 0 to"),
    "empty prompt": (["--prompt="], "--prompt is empty"),
    "temperature not a number": (["--temperature=hot"], "argument --temperature: invalid float"),
    "no checkpoint": (["--checkpoint=/nowhere/step_000002"], "/nowhere/step_000002 does not exist"),
    "checkpoint a file": (["--checkpoint={S}/args.json"], "args.json is not a directory"),
    "a run directory": (["--checkpoint={R}"], "step_000002"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags_are_one_line_before_the_model_is_read(case, steps, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was read before the flags were checked")

    monkeypatch.setattr(generate_cli, "load_model_for_eval", never)
    extra, message = BAD_FLAGS[case]
    places = {"{S}": str(steps["shard"]), "{R}": str(steps["shard"].parent)}
    for key, value in places.items():
        extra = [arg.replace(key, value) for arg in extra]
    argv = [f"--checkpoint={steps['shard']}", f"--prompt={PROMPT}", *extra]
    assert message in error_line(argv, capsys)


# ---------------------------------------------------------------- the export's training record
def test_the_export_records_its_training_and_the_checkpoint_agrees(
    steps, mds_tokens, tokenizer_dir
):
    saved = json.loads((steps["shard export"] / TRAINING_RECORD).read_text())
    assert saved["seq_len"] == SEQ_LEN and saved["step"] == 2
    assert saved["data_dir"] == str(mds_tokens) and saved["tokenizer_dir"] == str(tokenizer_dir)
    assert saved["run_name"] == "shard" and saved["checkpoint"] == str(steps["shard"].resolve())
    assert training_record(steps["shard export"]) == saved == training_record(steps["shard"])
    assert training_record(steps["sparse export"])["run_name"] == "sparse"
    # what lm-eval asks a tokenizer for its length; the checkpoint's own tokenizer is left as is
    assert AutoTokenizer.from_pretrained(str(steps["shard export"])).model_max_length == SEQ_LEN
    assert AutoTokenizer.from_pretrained(str(steps["shard"])).model_max_length > 10**9


def test_a_model_from_elsewhere_has_no_record_and_generates(elsewhere):
    assert training_record(elsewhere) is None
    assert greedy(elsewhere, tokens=4)


def test_a_run_named_by_default_is_recorded_under_its_run_directory(steps, tmp_path):
    """train.py's default name is not in its flags (args.json's run_name is null)."""
    step = shutil.copytree(steps["full"], tmp_path / "llama_tiny_0101" / "step_000002")
    args = json.loads((step / "args.json").read_text())
    (step / "args.json").write_text(json.dumps(args | {"run_name": None}))
    assert training_record(step)["run_name"] == "llama_tiny_0101"


DAMAGED_RECORDS = {
    "not JSON": ('{"seq_len": 64, "st', "is damaged (JSONDecodeError"),
    "empty": ("", "is damaged (JSONDecodeError"),
    "a list": ("[64, 2]", "not a JSON object"),
    "no seq_len": ({"step": 2}, "no 'seq_len'"),
    "seq_len 0": ({"seq_len": 0, "step": 2}, "'seq_len' is 0 (int), not an int >= 1"),
    "seq_len text": ({"seq_len": "64", "step": 2}, "'seq_len' is '64' (str)"),
    "seq_len true": ({"seq_len": True, "step": 2}, "'seq_len' is True (bool)"),
    "seq_len float": ({"seq_len": 64.0, "step": 2}, "'seq_len' is 64.0 (float)"),
    "step negative": ({"seq_len": 64, "step": -1}, "'step' is -1 (int), not an int >= 0"),
    "no step": ({"seq_len": 64}, "no 'step'"),
    "data_dir a number": ({"seq_len": 64, "step": 2, "data_dir": 3}, "'data_dir' is 3 (int)"),
}


@pytest.mark.parametrize("case", DAMAGED_RECORDS)
def test_a_damaged_training_record_is_one_line_naming_it(case, steps, tmp_path, capsys):
    export = shutil.copytree(steps["shard export"], tmp_path / "export")
    content, message = DAMAGED_RECORDS[case]
    text = content if isinstance(content, str) else json.dumps(content)
    (export / TRAINING_RECORD).write_text(text)
    with pytest.raises(UserError) as err:
        training_record(export)
    line = str(err.value)
    assert "\n" not in line and str(export / TRAINING_RECORD) in line and message in line, line
    assert line.endswith("export the checkpoint again with convert.py")
    if case == "seq_len 0":  # the command refuses it in the same line, before the model
        assert line in error_line([f"--checkpoint={export}", f"--prompt={PROMPT}"], capsys)


@pytest.mark.parametrize("case", ["missing", "seq_len null", "not JSON"])
def test_a_checkpoint_without_its_flags_is_not_exported(case, steps, tmp_path):
    """A step directory's record comes from its args.json: without it convert.py refuses in
    one line naming the file, and writes nothing."""
    step = shutil.copytree(steps["full"], tmp_path / "run" / "step_000002")
    if case == "missing":
        (step / "args.json").unlink()
    elif case == "seq_len null":
        args = json.loads((step / "args.json").read_text())
        (step / "args.json").write_text(json.dumps(args | {"seq_len": None}))
    else:
        (step / "args.json").write_text("{")
    with pytest.raises(UserError) as err:
        convert(step, tmp_path / "export")
    assert str(step / "args.json") in str(err.value) and "\n" not in str(err.value)
    assert "copy the whole step directory as training wrote it" in str(err.value)
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))
