"""Tokenizers of every kind of special tokens (no pad, pad = EOS, pad = UNK, a pad of its own;
with and without BOS): every token of the data trains, and the export generates.

transformers makes a config's pad_token_id the input embedding's padding_idx, a row that never
gets a gradient: with pad = EOS (Llama-2's usual fix), EOS, which ends every document, would
stay at its init. Exports must take `generate(**tokenizer(text, return_tensors="pt"))`, although
transformers 4's tokenizers return token_type_ids by default, which a Llama does not take.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from datas.local_corpus import train_byte_bpe
from datas.mds import HASH_ALGO
from datas.SmolLM.load_data import TrainLoader, build_train_loader
from train import model_inputs
from utils.attention import AttentionFlags, attention_implementation
from utils.checkpoint import save_transformers_weights, write_model_files
from utils.loss import model_nll_sum
from utils.model import build_meta_model, init_weights, load_model_config

EOS, PAD, UNK, BOS = "<|endoftext|>", "<|pad|>", "<unk>", "<s>"
PADS = {"no pad": None, "pad = EOS": EOS, "pad = UNK": UNK, "own pad": PAD}
KINDS = [
    pytest.param((pad, bos), id=f"{name}, {'BOS' if bos else 'no BOS'}")
    for name, pad in PADS.items()
    for bos in (False, True)
]
# Every special token also stands in one document, so that each one is in the data: the
# pre-tokenized MDS below holds them as ids, as a dataset tokenized elsewhere may (the
# project's own tokenizing reads their text as text).
DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer turns text into tokens, and a model predicts the next one.",
    f"{BOS}Special tokens can appear in text: {PAD} and {UNK} are tokens like any other.",
    "Packing concatenates documents, each followed by its end-of-text token.",
    "Every token that appears in the data must get a gradient in the embedding.",
]
SEQ_LEN = 32
ROWS = 8  # 256 tokens: more than the corpus, so the first batch holds every document


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A small byte-level BPE holding all four special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS, PAD, UNK, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(DOCUMENTS, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def mds(bpe: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documents as `tokens` blocks of SEQ_LEN, each followed by EOS, special tokens read
    as the tokens they name (fewer blocks than ROWS: the first batch holds them all)."""
    from streaming import MDSWriter

    eos = bpe.token_to_id(EOS)
    stream = [token for doc in DOCUMENTS for token in (*bpe.encode(doc).ids, eos)]
    blocks = [stream[i : i + SEQ_LEN] for i in range(0, len(stream) - SEQ_LEN + 1, SEQ_LEN)]
    assert len(blocks) <= ROWS
    root = tmp_path_factory.mktemp("kinds_mds") / "mds"
    with MDSWriter(out=str(root), columns={"tokens": "ndarray:int32"}, hashes=[HASH_ALGO]) as out:
        for block in blocks:
            out.write({"tokens": np.array(block, dtype=np.int32)})
    return root


@pytest.fixture(params=KINDS)
def kind_dir(request: pytest.FixtureRequest, bpe: Tokenizer, tmp_path: Path) -> Path:
    """The BPE as a transformers tokenizer of one kind, saved as a user's would be (default
    model_input_names); with BOS, encoding with special tokens starts with it, as Llama's."""
    pad, with_bos = request.param
    backend = Tokenizer.from_str(bpe.to_str())
    if with_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, bpe.token_to_id(BOS))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        unk_token=UNK,
        **({"pad_token": pad} if pad else {}),
        **({"bos_token": BOS} if with_bos else {}),
    )
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    return tmp_path / "tokenizer"


def training_model(
    mds: Path, tokenizer_dir: Path
) -> tuple[TrainLoader, PretrainedConfig, torch.nn.Module]:
    """The loader, the run's model config and the model, built as train.py's run() and
    build_model() do (in one process, unsharded)."""
    loader = build_train_loader(
        mds_root=str(mds), tokenizer_name=str(tokenizer_dir), seq_len=SEQ_LEN, micro_blocks=ROWS,
        num_workers=0, num_canonical_nodes=1, world_size=1, global_rank=0,
    )  # fmt: skip
    config = load_model_config("tiny", loader.vocab_size, loader.special_token_ids)
    model = build_meta_model(config, attention_implementation(AttentionFlags()))
    init_weights(model, seed=0, device=torch.device("cpu"))
    return loader, config, model


def test_every_token_of_the_batch_gets_a_gradient(mds: Path, kind_dir: Path) -> None:
    loader, _, model = training_model(mds, kind_dir)
    batch = next(iter(loader))
    special = {k: v for k, v in loader.special_token_ids.items() if v is not None}
    present = set(batch["input_ids"].unique().tolist())
    assert set(special.values()) <= present  # EOS, and BOS and pad where the kind has them
    assert model.config.pad_token_id == loader.special_token_ids["pad_token_id"]

    inputs = model_inputs(batch, torch.device("cpu"), model.config._attn_implementation)
    model_nll_sum(model, inputs, batch["labels"]).backward()

    grad = model.get_input_embeddings().weight.grad
    untrained = [token for token in sorted(present) if not grad[token].any()]
    assert untrained == [], f"tokens with no embedding gradient: {untrained} ({special})"


def test_the_export_generates_from_its_tokenizers_output(
    mds: Path, kind_dir: Path, tmp_path: Path
) -> None:
    loader, config, model = training_model(mds, kind_dir)
    out = tmp_path / "export"  # as the checkpointer and convert.py write it
    save_transformers_weights(config, model.state_dict(), out)
    write_model_files(config, out, AutoTokenizer.from_pretrained(str(kind_dir)))

    for name in ("config.json", "generation_config.json"):  # special ids kept for generate()
        saved = json.loads((out / name).read_text())
        for key, token in loader.special_token_ids.items():
            assert saved.get(key) == token, (name, key)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    assert sorted(inputs) == ["attention_mask", "input_ids"]
    if tokenizer.bos_token_id is not None:
        assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    exported = AutoModelForCausalLM.from_pretrained(str(out))
    generated = exported.generate(**inputs, max_new_tokens=3)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_the_demo_tokenizer_returns_only_what_a_llama_takes(tmp_path: Path) -> None:
    """The demo's and conftest's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(train_byte_bpe(DOCUMENTS, tmp_path, 300)))
    assert sorted(tokenizer("some text")) == ["attention_mask", "input_ids"]
