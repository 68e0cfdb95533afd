"""Training data: one module per corpus family, chosen by `--data_name`.

Adding a corpus is one module with a `build_train_loader(**kwargs)` and one line in
`_BUILDERS`. Nothing heavy is imported here: streaming and transformers load lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from utils.errors import UserError

# --data_name -> "module:function"; FineWeb-Edu is the seed's default and is stored as MDS
# like SmolLM, so both use the same loader.
_BUILDERS = {
    "FineWeb-Edu": "datas.SmolLM.load_data:build_train_loader",
    "SmolLM": "datas.SmolLM.load_data:build_train_loader",
}


def get_loader_builder(data_name: str) -> Callable:
    """The `build_train_loader` function for `--data_name`."""
    if data_name not in _BUILDERS:
        raise UserError(
            f"--data_name {data_name} is unknown; choose one of: {', '.join(_BUILDERS)}"
        )
    module, function = _BUILDERS[data_name].split(":")
    return getattr(import_module(module), function)
