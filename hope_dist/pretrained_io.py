"""The exported model folder format (Hugging Face-style, our model): write it, read it back, check it.
Scoring and generation from such a folder: hope_dist/pretrained.py (`from_pretrained`).

Folder layout:
  config.json                      {"architectures": ["HopeModel"], "model_type": "hope",
                                    "torch_dtype", "hope_dist": {"format", "model": ModelConfig,
                                    "source": where it came from}}
  model.safetensors                the weights, keyed as HopeModel.state_dict(); or, above
                                   --max-shard-size, model-0000i-of-0000n.safetensors with
                                   model.safetensors.index.json ({"metadata", "weight_map"})
  tokenizer.json                   when known (tokenizers.Tokenizer), with tokenizer_config.json
  configuration_hope.py,           two-line shims importing hope_dist.hf_modeling, named by config.json's
  modeling_hope.py                 auto_map, so AutoModelForCausalLM.from_pretrained(DIR,
                                   trust_remote_code=True) loads the folder (docs/eval_harness.md)
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from hope_dist.config import ConfigError, ModelConfig, from_dict
from hope_dist.dtypes import dtype_name
from hope_dist.errors import UserError
from hope_dist.model import HopeModel, materialize

FORMAT = "hope_dist.pretrained/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
EOT = "<|endoftext|>"
# transformers' remote code: thin shims, the logic lives in hope_dist.hf_modeling (installed).
REMOTE_CODE = {
    "configuration_hope.py": '"""transformers remote code for hope_dist exports (pip install hope-dist[eval])."""\n'
                             "from hope_dist.hf_modeling import HopeConfig  # noqa: F401\n",
    "modeling_hope.py": '"""transformers remote code for hope_dist exports (pip install hope-dist[eval])."""\n'
                        "from hope_dist.hf_modeling import HopeConfig, HopeForCausalLM  # noqa: F401\n",
}
AUTO_MAP = {"AutoConfig": "configuration_hope.HopeConfig", "AutoModelForCausalLM": "modeling_hope.HopeForCausalLM"}


class PretrainedError(UserError, ValueError):
    """An exported folder that cannot be used; the message names the file."""

    label = "export error"


# ------------------------------------------------------------------ writing and reading folders
def save_pretrained(folder: Path, weights: dict[str, torch.Tensor], model_cfg: ModelConfig, *,
                    dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None,
                    max_shard_bytes: int | None = None, source: dict[str, Any] | None = None) -> Path:
    """Write `weights` (full tensors) as an exported folder; shards above `max_shard_bytes`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = dtype_name(dtype)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in weights.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=1, sort_keys=True))
    config = {"architectures": ["HopeModel"], "model_type": "hope", "torch_dtype": name,
              "vocab_size": model_cfg.vocab_size, "hidden_size": model_cfg.d_model,
              "num_hidden_layers": model_cfg.n_layers, "num_attention_heads": model_cfg.n_heads,
              "hope_dist": {"format": FORMAT, "model": dataclasses.asdict(model_cfg), "source": source or {}},
              "auto_map": AUTO_MAP, "tie_word_embeddings": model_cfg.tie_embeddings, "use_cache": False}
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / TOKENIZER)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT,
             "model_max_length": None}, indent=1))
        from tokenizers import Tokenizer

        eot = Tokenizer.from_file(str(folder / TOKENIZER)).token_to_id(EOT)
        if eot is not None:  # generate() stops there
            config["eos_token_id"] = eot
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    for file, text in REMOTE_CODE.items():
        (folder / file).write_text(text)
    return folder


def read_config(folder: Path) -> ModelConfig:
    file = Path(folder) / CONFIG
    if not file.is_file():
        raise PretrainedError(f"{file}: missing; {folder} is not an exported hope_dist folder "
                              f"(make one with: python -m tools.convert export-hf CKPT OUT)")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise PretrainedError(f"{file}: not valid JSON ({e})") from None
    ours = config.get("hope_dist", {})
    if config.get("model_type") != "hope" or ours.get("format") != FORMAT:
        raise PretrainedError(
            f"{file}: model_type {config.get('model_type')!r} / architectures {config.get('architectures')}; "
            f"this loader reads hope_dist HopeModel folders ({FORMAT}), not another architecture")
    try:
        return from_dict(ModelConfig, ours["model"], prefix="model")
    except (ConfigError, KeyError) as e:
        raise PretrainedError(f"{file}: bad model config: {e}") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder (one file, or the shards its index lists)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS).is_file():
        weight_map, files = None, [WEIGHTS]
    else:
        raise PretrainedError(f"{folder / WEIGHTS}: missing (and no {INDEX}); export the checkpoint again")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        file = folder / name
        if not file.is_file():
            raise PretrainedError(f"{file}: shard missing (listed in {folder / INDEX})")
        try:
            part = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise PretrainedError(f"{file}: unreadable safetensors file ({e}); it is corrupt or truncated") from None
        if weight_map is not None:
            stray = sorted(k for k in part if weight_map.get(k) != name)
            if stray:
                raise PretrainedError(f"{file}: holds {stray[:3]} which {INDEX} does not map to it")
        weights.update(part)
    return weights


def check_tokenizer(tokenizer, vocab_size: int, file: Path) -> None:
    """A tokenizer with more ids than the model's embedding rows would index past it (an opaque
    IndexError deep in the model); name both sizes and the fix instead."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise PretrainedError(
            f"{file}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size} (config.json "
            f"hope_dist.model.vocab_size): ids >= {vocab_size} have no embedding. Export the folder with the "
            f"tokenizer the model was trained on: python -m tools.convert export-hf CKPT OUT --tokenizer "
            f"PATH/tokenizer.json")


def build_from_weights(model_cfg: ModelConfig, weights: dict[str, torch.Tensor], source: str,
                       device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> HopeModel:
    """A HopeModel holding exactly `weights` (computing in float32 unless `dtype`); a key or
    shape mismatch is an error naming `source` (the files the weights and config came from)."""
    with torch.device("meta"):
        model = HopeModel(model_cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k}: stored {tuple(weights[k].shape)}, config wants {tuple(s)}" for k, s in expected.items()
             if k in weights and weights[k].shape != s]
    if missing or unexpected or wrong:
        raise PretrainedError(
            f"{source}: the weights do not fit the model config"
            + (f"\n  missing {missing[:5]}" if missing else "")
            + (f"\n  unexpected {unexpected[:5]}" if unexpected else "")
            + "".join(f"\n  {w}" for w in wrong[:5]))
    materialize(model, device).load_state_dict(weights)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
