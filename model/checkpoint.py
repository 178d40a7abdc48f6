"""Checkpoints are Hugging Face model directories: `config.json`, `model.safetensors` (Hugging Face's
parameter names), `generation_config.json` and the tokenizer files.

The fused projections of our modules (`wqkv`, `w13`) are split on save and fused on load, so the files stay
standard. Writing is atomic: everything goes to a hidden sibling directory that is renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.llama import Transformer, TransformerBlock
from model.rope import precompute_rope

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or inconsistent; the message names the file."""


# ---------------------------------------------------------------- name mapping (ours <-> Hugging Face)


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face Llama names, with fused projections split."""
    c = model.config
    q_size, kv_size = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.tok_embeddings.weight}
    for i, block in enumerate(model.layers):
        layer = cast(TransformerBlock, block)
        p = f"model.layers.{i}."
        q, k, v = layer.attention.wqkv.weight.split([q_size, kv_size, kv_size], dim=0)
        gate, up = layer.feed_forward.w13.weight.chunk(2, dim=0)
        sd.update(
            {
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": layer.attention.wo.weight,
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": layer.feed_forward.w2.weight,
                p + "input_layernorm.weight": layer.attention_norm.weight,
                p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
            }
        )
    sd["model.norm.weight"] = model.norm.weight
    if not c.tie_embeddings:
        sd["lm_head.weight"] = model.output.weight
    return {k: v.detach().contiguous() for k, v in sd.items()}


def expected_hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, hd = c.n_embd, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (c.n_head * hd, d),
                p + "self_attn.k_proj.weight": (c.n_kv_head * hd, d),
                p + "self_attn.v_proj.weight": (c.n_kv_head * hd, d),
                p + "self_attn.o_proj.weight": (d, c.n_head * hd),
                p + "mlp.gate_proj.weight": (c.intermediate_size, d),
                p + "mlp.up_proj.weight": (c.intermediate_size, d),
                p + "mlp.down_proj.weight": (d, c.intermediate_size),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


def from_hf_state_dict(
    config: ModelConfig,
    hf: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    source: str = "state dict",
) -> Transformer:
    """Build our model from Hugging Face-named tensors, fusing projections; shapes are checked and a
    mismatch names the tensor and `source`."""
    hf = dict(hf)
    if config.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    expected = expected_hf_shapes(config)
    missing = sorted(set(expected) - set(hf))
    unexpected = sorted(set(hf) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(hf[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(hf[name].shape)}, expected {shape}")

    def get(name: str) -> torch.Tensor:
        return hf[name].to(device=device, dtype=dtype)

    ours: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": get("model.embed_tokens.weight"),
        "norm.weight": get("model.norm.weight"),
    }
    for i in range(config.n_layer):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        ours[o + "attention.wqkv.weight"] = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        ours[o + "attention.wo.weight"] = get(p + "self_attn.o_proj.weight")
        ours[o + "feed_forward.w13.weight"] = torch.cat([get(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
        ours[o + "feed_forward.w2.weight"] = get(p + "mlp.down_proj.weight")
        ours[o + "attention_norm.weight"] = get(p + "input_layernorm.weight")
        ours[o + "ffn_norm.weight"] = get(p + "post_attention_layernorm.weight")
    if not config.tie_embeddings:
        ours["output.weight"] = get("lm_head.weight")

    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(ours, strict=False, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    cos, sin = precompute_rope(config.head_dim, config.block_size, config.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model


# ---------------------------------------------------------------- writing


def generation_config_dict(config: ModelConfig, **overrides: Any) -> dict[str, Any]:
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    gen.update(overrides)
    return gen


def atomic_directory(target: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` on a hidden sibling of `target`, fsync it, then rename it to `target`.

    A reader that polls `target` sees either nothing or the complete directory. An existing `target` is
    replaced (moved aside, then deleted): a reader still reading the previous version then loses it, which is
    why the trainer writes each checkpoint under a new name. If `write` raises, the temporary directory is
    removed and `target` is untouched.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        # mkdtemp makes a private directory; checkpoints are read by other users (the server container).
        os.chmod(tmp, 0o755)
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o644)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir():
                os.chmod(f, 0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_files(
    directory: Path,
    model: Transformer,
    tokenizer: Any | None = None,
    dtype: torch.dtype | None = None,
    generation_config: dict[str, Any] | None = None,
) -> None:
    """Write a Hugging Face model directory's files into `directory` (not atomic by itself)."""
    tensors = to_hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    stored = next(iter(tensors.values())).dtype
    tensors = {k: v.cpu() for k, v in tensors.items()}
    hf_config = model.config.to_hf_dict()
    hf_config["torch_dtype"] = str(stored).removeprefix("torch.")
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    gen = generation_config or generation_config_dict(model.config)
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    model: Transformer,
    tokenizer: Any | None = None,
    dtype: torch.dtype | None = None,
    generation_config: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically write a Hugging Face checkpoint directory; `extra(tmp_dir)` may add files (trainer state)
    before the directory becomes visible."""

    def write(tmp: Path) -> None:
        write_model_files(tmp, model, tokenizer, dtype, generation_config)
        if extra is not None:
            extra(tmp)

    return atomic_directory(out_dir, write)


# ---------------------------------------------------------------- reading


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (it does not exist or is not a directory)")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (a checkpoint directory needs config.json)")
    try:
        return ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: invalid config: {e}") from e


def read_hf_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a directory's `model.safetensors` (or its sharded index)."""
    path = Path(path)
    single, index = path / WEIGHTS_FILE, path / WEIGHTS_INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: invalid index: {e}") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"{single}: missing (a checkpoint directory needs model.safetensors)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (named by {index.name})")
        try:
            # Copied out of the mmap that load_file returns: a tensor the model kept in the file's dtype would stay
            # backed by the file, and a checkpoint overwritten in place (`cp` onto a served one) would then end the
            # process with SIGBUS at its next step. The copy costs ~0.2 s for the 135M model in fp32; reading the
            # file into bytes first (safetensors.torch.load) took 0.8 s.
            tensors.update({name: t.clone() for name, t in load_file(str(f)).items()})
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable safetensors file (truncated or corrupt?): {e}") from e
    return tensors


def load_model(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Transformer:
    """Load a Hugging Face Llama checkpoint directory (ours, or any local one) into our model."""
    config = read_config(path)
    tensors = read_hf_tensors(path)
    model = from_hf_state_dict(config, tensors, dtype, device, source=str(Path(path) / WEIGHTS_FILE))
    return model.eval()


def is_complete_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Cheap check that a directory holds a loadable checkpoint's files (does not read the weights)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and ((path / WEIGHTS_FILE).is_file() or (path / WEIGHTS_INDEX_FILE).is_file())
