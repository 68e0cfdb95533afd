"""Sample text from a checkpoint or an export.

    python generate.py --checkpoint runs/my_run/step_001000 --prompt "The history of"

--checkpoint is a `step_<N>` checkpoint of any `--ckpt_type` (a sparse run's as its effective
dense weights) or a transformers model directory (an export of convert.py). Greedy by default
(`--temperature 0`); with a temperature > 0, sampling with that temperature and nucleus
`--top_p`, the same text again for the same `--seed` on the same device. The prompt is
tokenized as training tokenizes a document: without special tokens (no BOS, which training
never puts before a document). Prints the prompt and its continuation; generation stops at EOS.

A prompt plus --max_new_tokens longer than the run's --seq_len (from the checkpoint's
args.json, an export's training.json, or else the config's max_position_embeddings) is a
warning, not an error: the model runs past the length it trained at, which is worth trying.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datas.C4.c4_eval import check_checkpoint_dir, load_model_for_eval
from datas.tokenizer import load_tokenizer
from utils.checkpoint import training_record
from utils.errors import ArgumentParser, UserError, exit_on_user_error

MAX_SEED = 2**64 - 1  # torch.manual_seed takes seeds up to here


@dataclass(frozen=True)
class Decoding:
    """How to continue the prompt: the command's flags but --checkpoint and --prompt."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    num_samples: int = 1


def generate(checkpoint: Path, prompt: str, decoding: Decoding = Decoding()) -> list[str]:
    """The continuations of `prompt` (not included) that the model in `checkpoint` generates,
    one per sample. Every flag and file is checked before the model is read."""
    check_decoding(prompt, decoding)
    check_model_dir(checkpoint)
    record = training_record(checkpoint)
    tokenizer = load_tokenizer(checkpoint, "--checkpoint")
    prompt_ids = encode_prompt(tokenizer, prompt)
    model = load_model_for_eval(checkpoint).eval()
    warn_past_trained_length(len(prompt_ids), decoding.max_new_tokens, record, model.config)
    return [continuation(tokenizer, prompt_ids, ids) for ids in sample(model, prompt_ids, decoding)]


def check_decoding(prompt: str, decoding: Decoding) -> None:
    """The flags' ranges, before any file is read."""
    if not prompt:
        raise UserError("--prompt is empty; give the text to continue")
    if decoding.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1 (got {decoding.max_new_tokens})")
    if not (math.isfinite(decoding.temperature) and decoding.temperature >= 0):
        raise UserError(
            f"--temperature must be 0 (greedy) or a positive number (got {decoding.temperature})"
        )
    if not 0 < decoding.top_p <= 1:  # NaN fails too
        raise UserError(f"--top_p must be in (0, 1] (got {decoding.top_p}); 1 keeps every token")
    if decoding.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1 (got {decoding.num_samples})")
    refuse_sampling_flags_when_greedy(decoding)
    if decoding.seed is not None and not 0 <= decoding.seed <= MAX_SEED:
        raise UserError(f"--seed must be from 0 to {MAX_SEED} (got {decoding.seed})")


def refuse_sampling_flags_when_greedy(decoding: Decoding) -> None:
    """Flags that only sampling reads are refused with greedy decoding, not ignored."""
    if decoding.temperature > 0:
        return
    if decoding.num_samples > 1:
        raise UserError(
            f"--num_samples {decoding.num_samples} with --temperature 0 gives the same greedy "
            "text each time; give a --temperature > 0 to sample"
        )
    if decoding.top_p < 1:
        raise UserError(
            f"--top_p {decoding.top_p} applies to sampling only and --temperature 0 is greedy; "
            "give a --temperature > 0 to sample"
        )


def check_model_dir(checkpoint: Path) -> None:
    """--checkpoint is a directory, and not a run directory (refused naming its steps)."""
    if not checkpoint.is_dir():
        what = "is not a directory" if checkpoint.exists() else "does not exist"
        raise UserError(
            f"--checkpoint {checkpoint} {what}; give a step_<N> checkpoint or a transformers "
            "model directory (an export of convert.py)"
        )
    check_checkpoint_dir(checkpoint)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's tokens as training tokenizes a document: no special tokens added."""
    # verbose=False: a prompt past an export's model_max_length gets our warning, not this one
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids:
        raise UserError(f"--prompt {prompt!r} has no tokens; give the text to continue")
    return ids


def warn_past_trained_length(
    prompt_tokens: int, max_new_tokens: int, record: dict | None, config: Any
) -> None:
    """A warning when the text would run past what the model trained at (or, for a model
    from elsewhere, past its config's max_position_embeddings)."""
    if record is not None:
        limit, source = record["seq_len"], "the --seq_len it trained at"
    else:
        limit = getattr(config, "max_position_embeddings", None)
        source = "its config's max_position_embeddings"
    total = prompt_tokens + max_new_tokens
    if limit is not None and total > limit:
        print(
            f"warning: the prompt's {prompt_tokens} tokens + --max_new_tokens {max_new_tokens} "
            f"= {total} tokens, past the model's {limit}, {source}; the text past it is the "
            "model's guess at a length it never saw",
            file=sys.stderr,
            flush=True,
        )


def sample(model: Any, prompt_ids: list[int], decoding: Decoding) -> list[list[int]]:
    """Each sample's tokens, prompt included, from transformers' generate."""
    inputs = torch.tensor([prompt_ids], device=model.device)
    if decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    # The flags' config replaces the model's own: transformers fills what a config passed to
    # generate() leaves at its defaults from the model's (a downloaded model's do_sample, top_k,
    # repetition_penalty), and 4.x and 5.x disagree on how to turn that off.
    model.generation_config = generation_config(model, decoding)
    with torch.no_grad():
        outputs = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs))
    return outputs.tolist()


def generation_config(model: Any, decoding: Decoding) -> Any:
    """The flags' decoding, with the special ids of the model's generation_config.json."""
    from transformers import GenerationConfig

    own = model.generation_config
    eos = own.eos_token_id
    # one prompt pads nothing, but several samples that stop at different lengths are padded
    pad = own.pad_token_id if own.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    ids = {"bos_token_id": own.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}
    if decoding.temperature == 0:
        return GenerationConfig(do_sample=False, max_new_tokens=decoding.max_new_tokens, **ids)
    return GenerationConfig(
        do_sample=True,
        temperature=decoding.temperature,
        top_p=decoding.top_p,
        top_k=0,  # transformers' default top_k of 50 would cut the distribution too
        num_return_sequences=decoding.num_samples,
        max_new_tokens=decoding.max_new_tokens,
        **ids,
    )


def continuation(tokenizer: Any, prompt_ids: list[int], ids: list[int]) -> str:
    """The text the new tokens add to the prompt's. Decoding the whole sequence and cutting the
    prompt's text off keeps the space that a SentencePiece token decoded alone would drop."""
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if whole.startswith(prefix):
        return whole[len(prefix) :]
    # a token that merges across the prompt's end: the new tokens on their own
    return tokenizer.decode(ids[len(prompt_ids) :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> list[str]:
    parser = ArgumentParser(prog="python generate.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a step_<N> checkpoint (any --ckpt_type) or a transformers directory")  # fmt: skip
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling's mass")
    parser.add_argument("--seed", type=int, help="the same samples for the same seed")
    parser.add_argument("--num_samples", type=int, default=1, help="samples (needs sampling)")
    with exit_on_user_error():
        args = parser.parse_args(argv)
        decoding = Decoding(
            args.max_new_tokens, args.temperature, args.top_p, args.seed, args.num_samples
        )
        texts = generate(args.checkpoint, args.prompt, decoding)
    for number, text in enumerate(texts, 1):
        if len(texts) > 1:
            print(f"--- sample {number} of {len(texts)} ---")
        print(args.prompt + text, flush=True)
    return texts


if __name__ == "__main__":
    main()
