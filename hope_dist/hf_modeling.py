"""HOPE as a transformers model, so an exported folder loads with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

The folder's configuration_hope.py / modeling_hope.py (written by save_pretrained) only import
from here, so the logic is versioned with hope_dist rather than copied into every export. The
model's parameters sit at the top level under HopeModel's names, so the folder's safetensors
load unchanged. There is no KV/fast-weight cache: every generation step recomputes the whole
sequence (correct for all three mixers, O(T^2) for generation; use hope_dist.from_pretrained
or the lm-eval wrapper for long generations, they carry the state).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hope_dist.config import ModelConfig, from_dict
from hope_dist.model import HopeModel
from hope_dist.pretrained_io import TOKENIZER, check_tokenizer, read_config


class HopeConfig(PreTrainedConfig):
    """config.json of an exported folder; `hope_dist["model"]` is the ModelConfig."""

    model_type = "hope"

    vocab_size: int = 32000
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    hope_dist: dict | None = None
    use_cache: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def model_config(self) -> ModelConfig:
        if not self.hope_dist or "model" not in self.hope_dist:
            raise ValueError("config.json: no hope_dist.model section; export the folder with "
                             "python -m tools.convert export-hf CKPT OUT")
        return from_dict(ModelConfig, self.hope_dist["model"], prefix="model")


class HopeForCausalLM(PreTrainedModel, GenerationMixin):
    """HopeModel behind the transformers API (forward -> logits, loss; generate without cache)."""

    config_class = HopeConfig
    base_model_prefix = "hope"
    main_input_name = "input_ids"
    _supports_cache_class = False
    _no_split_modules = ["Block"]

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        hope = HopeModel(config.model_config())
        # HopeModel's children at the top level: state_dict keys equal the exported ones.
        self.tok_embeddings, self.layers = hope.tok_embeddings, hope.layers
        self.norm, self.output = hope.norm, hope.output
        object.__setattr__(self, "_hope", hope)  # not a submodule: no "hope." key prefix
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, after checking a local folder's tokenizer.json fits the model."""
        folder = Path(str(pretrained_model_name_or_path))
        if (folder / TOKENIZER).is_file():
            from tokenizers import Tokenizer

            check_tokenizer(Tokenizer.from_file(str(folder / TOKENIZER)), read_config(folder).vocab_size,
                            folder / TOKENIZER)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module):  # weights always come from the folder
        pass

    def get_input_embeddings(self):
        return self.tok_embeddings

    def get_output_embeddings(self):
        return self.output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("HopeForCausalLM: attention_mask has padding before tokens (left padding); the "
                             "memory state would read the pad tokens. Pad on the right, or generate one "
                             "sequence at a time")
        logits = self._hope(input_ids)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No cache: every step sees the whole sequence."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
