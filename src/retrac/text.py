"""Prompts -> ``encoder_hidden_states``: a frozen text encoder and its tokenizer.

The conditioning ``c`` of a text-to-image denoiser (docs/design.md section 1, ``eps_theta(x_t, t,
c)``) is the text encoder's last hidden state of the tokenized caption, computed as diffusers'
Stable Diffusion pipelines and training scripts compute it: the tokenizer pads and truncates to
its ``model_max_length``, and the attention mask is passed only when the encoder's config asks
for it (``use_attention_mask``). The text encoder is frozen (it does not count among the
parameters whose gradients are attributed): its states are computed once per distinct caption
and reused for every event and checkpoint while they fit :data:`MEMO_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from retrac.errors import ConfigError, DataError

__all__ = ["MEMO_BYTES", "PromptEncoder"]

MEMO_BYTES = 1 << 30  # encoder_hidden_states kept per distinct prompt (least recently used evicted)
ENCODE_BATCH = 32


def _tokenizer_sha256(tokenizer) -> str:
    """sha256 of what decides the token ids: the class, the vocabulary and the maximum length."""
    vocab = tokenizer.get_vocab()
    record = {
        "class": type(tokenizer).__name__,
        "model_max_length": int(tokenizer.model_max_length),
        "vocab": sorted(vocab.items()),
    }
    return hashlib.sha256(json.dumps(record, ensure_ascii=True).encode()).hexdigest()


class PromptEncoder:
    """A frozen text encoder (e.g. ``CLIPTextModel``) and its tokenizer.

    Args:
        text_encoder: a transformers text model whose output's first element (``last_hidden_state``)
            is ``(B, L, D)``.
        tokenizer: its tokenizer (``CLIPTokenizer`` or any ``PreTrainedTokenizer``).
        max_length: tokens per prompt (default: ``tokenizer.model_max_length``, as diffusers uses).

    Raises:
        ConfigError: a tokenizer without a usable ``model_max_length`` and no ``max_length`` given.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, max_length: int | None = None) -> None:
        length = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
        if not isinstance(length, int) or not 1 <= length <= 1 << 16:
            raise ConfigError(
                f"tokenizer max length {length!r} is not usable; save the tokenizer with model_max_length set "
                "(CLIP: 77)."
            )
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = length
        self.use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        self._memo: OrderedDict[str, Tensor] = OrderedDict()
        self._memo_bytes = 0
        self.path: str | None = None  # where it was loaded from (recorded, not compared)
        self._record: dict | None = None

    @property
    def hidden_size(self) -> int:
        """``D`` of the states."""
        return int(self.text_encoder.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def to(self, device: torch.device | str) -> PromptEncoder:
        if torch.device(device) != self.device:
            self.text_encoder.to(device)
            self._memo.clear()
            self._memo_bytes = 0
        return self

    def to_dict(self) -> dict:
        """What the store records (and compares): classes, sha256 of weights and vocabulary, length (and
        ``path``, where it was loaded from, which is not compared)."""
        if self._record is None:
            from retrac.checkpoints import state_dict_sha256

            self._record = {
                "class": type(self.text_encoder).__name__,
                "sha256": state_dict_sha256(self.text_encoder.state_dict()),
                "tokenizer": type(self.tokenizer).__name__,
                "tokenizer_sha256": _tokenizer_sha256(self.tokenizer),
                "max_length": self.max_length,
                "hidden_size": self.hidden_size,
            }
        return {**self._record, **({"path": self.path} if self.path else {})}

    @torch.no_grad()
    def _encode_new(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device) if self.use_attention_mask else None
        return self.text_encoder(ids, attention_mask=mask)[0].float()  # last_hidden_state (B, L, D)

    def encode(self, prompts: Sequence[str], name: str = "prompts") -> Tensor:
        """``encoder_hidden_states`` ``(B, L, D)`` float32 on the encoder's device, one row per prompt.

        Raises:
            DataError: a prompt that is not a string (a missing caption), named by position.
        """
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise DataError(
                    f"{name}[{i}] is {prompt!r}, not a string; give every sample a caption (an empty string "
                    "is the unconditional prompt)."
                )
        new = list(dict.fromkeys(p for p in prompts if p not in self._memo))
        fresh: dict[str, Tensor] = {}
        for start in range(0, len(new), ENCODE_BATCH):
            part = new[start : start + ENCODE_BATCH]
            for prompt, states in zip(part, self._encode_new(part), strict=True):
                fresh[prompt] = states
        out = torch.stack([fresh[p] if p in fresh else self._memo[p] for p in prompts])
        for prompt in prompts:
            if prompt in self._memo:
                self._memo.move_to_end(prompt)
        for prompt, states in fresh.items():
            self._memo[prompt] = states
            self._memo_bytes += states.numel() * states.element_size()
        while self._memo and self._memo_bytes > MEMO_BYTES:
            _, dropped = self._memo.popitem(last=False)
            self._memo_bytes -= dropped.numel() * dropped.element_size()
        return out
