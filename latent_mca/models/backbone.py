"""The frozen (or partly trainable) vision-language backbone: the only door to Hugging Face transformers.

Everything else in latent_mca receives a :class:`Backbone` and works with plain tensors: final normalised
hidden states ``e`` of shape ``(B, L, d)``, the ``lm_head`` that turns them into next-token logits, and an
incremental decoding API (:meth:`Backbone.prefill` / :meth:`Backbone.step`) over a KV cache.

Any VLM that ``AutoModelForImageTextToText`` and ``AutoProcessor`` can load works: Qwen2.5-VL and Qwen2-VL
(3-D multimodal RoPE) and LLaVA-style models (1-D RoPE) are tested. Token ids (image placeholder, padding,
end of turn) are always read from the processor and the model config, never written as literals.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config attributes that name tokens belonging to an image segment, across families.
_IMAGE_SEGMENT_ATTRS = (
    "image_token_id",
    "image_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
    "boi_token_id",
    "eoi_token_id",
)


@dataclass
class BackboneConfig:
    """How to load the backbone and which of its parameters train.

    Attributes:
        path: Local directory or hub id understood by ``from_pretrained`` (a hub id needs network access).
        dtype: Parameter dtype.
        attn_implementation: Attention kernel passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
        trainable: ``none`` (frozen; stage 1 and latent RL), ``all``, ``top_n`` (the last ``top_n_layers``
            decoder layers and the final norm) or ``lora`` (adapters through peft).
        top_n_layers: Number of top decoder layers to train when ``trainable == "top_n"``.
        train_vision: Also train the vision tower when ``trainable`` is ``all`` or ``top_n``.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
        lora_target_modules: Module name suffixes that receive adapters (language model only).
        gradient_checkpointing: Recompute activations in the backward pass (trainable backbones only).
        trust_remote_code: Forwarded to ``from_pretrained`` for models with custom code.
    """

    path: str = ""
    dtype: DType = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trainable: Literal["none", "all", "top_n", "lora"] = "none"
    top_n_layers: int = 0
    train_vision: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


# Phase hyper-parameters (and so Lightning checkpoints) hold this dataclass: allow it when a checkpoint is resumed
# with torch.load(weights_only=True), Lightning's default.
torch.serialization.add_safe_globals([BackboneConfig])


@dataclass
class DecodeState:
    """Everything needed to extend a batch of sequences by one token.

    Attributes:
        cache: The transformers KV cache (grows in place).
        attention_mask: Mask over every cached position plus the next one, shape ``(B, T)``.
        next_position: RoPE position of the next token per row (rope deltas included), shape ``(B,)``.
    """

    cache: Any
    attention_mask: Tensor  # (B, T)
    next_position: Tensor  # (B,)

    def repeat_interleave(self, repeats: int) -> DecodeState:
        """Expand every row ``repeats`` times (several samples per prompt share one prefill)."""
        if repeats == 1:
            return self
        self.cache.batch_repeat_interleave(repeats)
        return DecodeState(
            cache=self.cache,
            attention_mask=self.attention_mask.repeat_interleave(repeats, dim=0),
            next_position=self.next_position.repeat_interleave(repeats, dim=0),
        )


class ImageTokenMismatchError(ValueError):
    """The processor inserted a different number of image placeholder tokens than the vision tower yields."""


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the framework needs, read from a processor and a model config (never literals).

    Attributes:
        image_token_id: The image placeholder the processor expands (None for text-only models).
        image_segment_ids: Every id belonging to an image segment (placeholder and its delimiters).
        pad_token_id: Padding id.
        eos_token_ids: Ids that end an assistant turn.
    """

    image_token_id: int | None
    image_segment_ids: tuple[int, ...]
    pad_token_id: int
    eos_token_ids: tuple[int, ...]


def read_special_tokens(processor: Any, model_config: Any, generation_config: Any = None) -> SpecialTokens:
    """Collect the special token ids from a processor, a model config and an optional generation config.

    Raises:
        ImageTokenMismatchError: If processor and model config disagree on the image token.
        ValueError: If no pad/EOS token can be found.
    """
    tok = getattr(processor, "tokenizer", processor)
    cfg_img = getattr(model_config, "image_token_id", None)
    if cfg_img is None:
        cfg_img = getattr(model_config, "image_token_index", None)
    proc_img = getattr(processor, "image_token_id", None)
    if proc_img is not None and cfg_img is not None and int(proc_img) != int(cfg_img):
        raise ImageTokenMismatchError(
            f"processor image token id {proc_img} differs from the model config's image token id {cfg_img}: "
            "the processor and the model come from different checkpoints"
        )
    image = proc_img if proc_img is not None else cfg_img
    segment = {int(v) for a in _IMAGE_SEGMENT_ATTRS if (v := getattr(model_config, a, None)) is not None}
    if image is not None:
        segment.add(int(image))
    text_cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    candidates = (tok.pad_token_id, tok.eos_token_id, getattr(text_cfg, "pad_token_id", None),
                  getattr(text_cfg, "eos_token_id", None))
    pad = next((c for c in candidates if isinstance(c, int)), None)
    if pad is None:
        raise ValueError("neither the tokenizer nor the model config defines a pad or EOS token")
    eos: set[int] = set()
    for source in (tok.eos_token_id, getattr(text_cfg, "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
    gen_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if gen_eos is not None:
        eos.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    vocab = int(getattr(text_cfg, "vocab_size", None) or len(tok))
    eos = {i for i in eos if 0 <= i < vocab}
    if not eos:
        raise ValueError("no end-of-turn token id found in the tokenizer or generation config")
    return SpecialTokens(
        image_token_id=None if image is None else int(image),
        image_segment_ids=tuple(sorted(segment)),
        pad_token_id=int(pad),
        eos_token_ids=tuple(sorted(eos)),
    )


def load_special_tokens(path: str | Path, processor: Any = None, *, trust_remote_code: bool = False) -> SpecialTokens:
    """Special token ids of a saved backbone (reads its config; loads the processor unless given)."""
    from transformers import AutoConfig, GenerationConfig

    processor = processor if processor is not None else load_processor(path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    try:
        generation = GenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json saved beside the model
        generation = None
    return read_special_tokens(processor, config, generation)


def resolve_dtype(dtype: DType | torch.dtype) -> torch.dtype:
    """Map a config string to a torch dtype."""
    return dtype if isinstance(dtype, torch.dtype) else _DTYPES[dtype]


def load_processor(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """Load the processor (tokenizer + image processor + chat template) saved beside a backbone.

    Args:
        path: Local directory or hub id.
        trust_remote_code: Forwarded to ``AutoProcessor.from_pretrained``.

    Returns:
        The transformers processor.
    """
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def build_model_from_config(config: Any, *, seed: int | None = None, dtype: DType = "float32") -> nn.Module:
    """Instantiate a randomly initialised image-text-to-text model from a transformers config.

    Args:
        config: A transformers ``PretrainedConfig`` of a VLM.
        seed: Seed for the random initialisation (None: current RNG state).
        dtype: Parameter dtype.

    Returns:
        The transformers model.
    """
    from transformers import AutoModelForImageTextToText

    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=resolve_dtype(dtype))


class Backbone(nn.Module):
    """A Hugging Face VLM seen as a state encoder plus ``lm_head``.

    Args:
        model: A transformers image-text-to-text model (``...ForConditionalGeneration``).
        processor: Its processor (tokenizer, image processor, chat template). Optional for pure tensor use.
        config: Loading and training options (``path`` is informational when a model is passed directly).
    """

    def __init__(self, model: nn.Module, processor: Any = None, config: BackboneConfig | None = None) -> None:
        super().__init__()
        self.config = config or BackboneConfig()
        self.model = model
        self.processor = processor
        self._special: SpecialTokens | None = None
        self._uses_mrope = hasattr(self._decoder, "get_rope_index")
        # transformers 5.24 renamed the KV cache argument and output field from `past_key_values` to `cache`.
        decoder_args = inspect.signature(self._decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in decoder_args else "past_key_values"
        image_kw = inspect.signature(self._decoder.get_image_features).parameters
        self._image_feature_args = {n for n in image_kw if n not in ("self", "kwargs")}
        self.apply_trainable()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, config: BackboneConfig | str, **overrides: Any) -> Backbone:
        """Load model and processor with ``AutoModelForImageTextToText`` / ``AutoProcessor``.

        Args:
            config: A :class:`BackboneConfig` or a path / hub id.
            **overrides: Field overrides applied to ``config``.

        Returns:
            The wrapped backbone, frozen or trainable as configured.
        """
        from transformers import AutoModelForImageTextToText

        if isinstance(config, str):
            config = BackboneConfig(path=config)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"BackboneConfig has no field {key!r}")
            setattr(config, key, value)
        if not config.path:
            raise ValueError("backbone.path is empty: set it to a local checkpoint directory or a hub id")
        path = Path(config.path)
        if path.is_absolute() or str(config.path).startswith("."):
            if not path.exists():
                raise FileNotFoundError(
                    f"backbone.path {config.path!r} does not exist; build the demo backbone with "
                    "`python -m latent_mca tiny-backbone --out DIR` or point it at a checkpoint"
                )
        model = AutoModelForImageTextToText.from_pretrained(
            str(config.path),
            dtype=resolve_dtype(config.dtype),
            attn_implementation=config.attn_implementation,
            trust_remote_code=config.trust_remote_code,
        )
        processor = load_processor(config.path, trust_remote_code=config.trust_remote_code)
        return cls(model, processor, config)

    @classmethod
    def from_config(cls, model_config: Any, processor: Any = None, config: BackboneConfig | None = None,
                    seed: int | None = None) -> Backbone:
        """Build a randomly initialised backbone from a transformers config (tests, tiny demo models).

        Args:
            model_config: The transformers ``PretrainedConfig``.
            processor: The matching processor, if any.
            config: Training options.
            seed: Initialisation seed.

        Returns:
            The wrapped backbone.
        """
        config = config or BackboneConfig()
        model_config._attn_implementation = config.attn_implementation
        model = build_model_from_config(model_config, seed=seed, dtype=config.dtype)
        return cls(model, processor, config)

    def apply_trainable(self) -> None:
        """Set ``requires_grad`` according to ``config.trainable`` (LoRA adapters are added here)."""
        mode = self.config.trainable
        self.model.requires_grad_(False)
        if mode == "none":
            self.model.eval()
            return
        if mode == "all":
            self.text_model.requires_grad_(True)
            self.lm_head.requires_grad_(True)
        elif mode == "top_n":
            layers = self.text_model.layers
            n = self.config.top_n_layers
            if not 0 < n <= len(layers):
                raise ValueError(f"backbone.top_n_layers={n} must be in [1, {len(layers)}] for this model")
            for layer in layers[len(layers) - n:]:
                layer.requires_grad_(True)
            self.text_model.norm.requires_grad_(True)
        elif mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha,
                              lora_dropout=self.config.lora_dropout,
                              target_modules=list(self.config.lora_target_modules))
            inject_adapter_in_model(lora, self.text_model)
            for name, param in self.text_model.named_parameters():
                param.requires_grad_("lora_" in name)
        else:
            raise ValueError(f"backbone.trainable must be none|all|top_n|lora, got {mode!r}")
        if self.config.train_vision and mode in ("all", "top_n"):
            self.vision_model.requires_grad_(True)
        if self.config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def train(self, mode: bool = True) -> Backbone:
        """Keep a frozen backbone in eval mode (no dropout) whatever the surrounding module does."""
        super().train(mode and self.config.trainable != "none")
        return self

    # ------------------------------------------------------------------ structure
    @property
    def _decoder(self) -> nn.Module:
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        """The language model (embeddings, decoder layers, final norm)."""
        return self._decoder.language_model

    @property
    def vision_model(self) -> nn.Module:
        """The vision tower (and its projector where the family has one)."""
        dec = self._decoder
        return getattr(dec, "visual", None) or getattr(dec, "vision_tower")

    @property
    def lm_head(self) -> nn.Module:
        """The output projection from hidden states to vocabulary logits."""
        return self.model.get_output_embeddings()

    @property
    def model_config(self) -> Any:
        """The transformers config of the wrapped model."""
        return self.model.config

    @property
    def text_config(self) -> Any:
        """The language model's config."""
        return self.model.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        """Width ``d`` of the hidden states."""
        return int(self.text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Number of rows of ``lm_head``."""
        return int(self.lm_head.weight.shape[0])

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        if self.processor is None:
            raise RuntimeError("this Backbone was built without a processor")
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def special_tokens(self) -> SpecialTokens:
        """Image, padding and end-of-turn token ids (from the processor and the model config)."""
        if self._special is None:
            self._special = read_special_tokens(self.processor if self.processor is not None else _NoTokenizer(),
                                                self.model_config, getattr(self.model, "generation_config", None))
        return self._special

    @property
    def image_token_id(self) -> int | None:
        """Id of the image placeholder token."""
        return self.special_tokens.image_token_id

    @property
    def image_segment_token_ids(self) -> list[int]:
        """Ids of every token that belongs to an image segment (placeholder and its delimiters)."""
        return list(self.special_tokens.image_segment_ids)

    @property
    def pad_token_id(self) -> int:
        """Padding id (the tokenizer's pad token, else its EOS)."""
        return self.special_tokens.pad_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an assistant turn (tokenizer EOS and the generation config's EOS ids)."""
        return list(self.special_tokens.eos_token_ids)

    # ------------------------------------------------------------------ encoding
    def _positions(self, input_ids: Tensor, attention_mask: Tensor, vision: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Compute RoPE position ids for a full (prefill) pass, and the next position of each row."""
        text_pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, L), left padding -> 0
        if not self._uses_mrope:
            return text_pos, text_pos[:, -1] + 1
        token_types = vision.get("mm_token_type_ids")
        if token_types is None:
            token_types = torch.zeros_like(input_ids)
            if self.image_token_id is not None:
                token_types = (input_ids == self.image_token_id).long()
        grid = vision.get("image_grid_thw")
        if grid is None:
            pos3 = text_pos.unsqueeze(0).expand(3, -1, -1)  # (3, B, L)
            return pos3, text_pos[:, -1] + 1
        pos3, deltas = self._decoder.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=grid, attention_mask=attention_mask
        )  # (3, B, L), (B, 1)
        next_pos = text_pos[:, -1] + 1 + deltas.view(-1).to(text_pos.device)
        return pos3, next_pos

    def _image_outputs(self, input_ids: Tensor, vision: dict[str, Tensor]) -> dict[str, Any] | None:
        """Run the vision tower once and check that its feature count matches the placeholder tokens."""
        if not vision or "pixel_values" not in vision:
            return None
        kwargs = {k: v for k, v in vision.items() if k in self._image_feature_args}
        out = self._decoder.get_image_features(**kwargs, return_dict=True)
        feats = out.pooler_output
        n_features = sum(int(f.shape[0]) for f in feats) if isinstance(feats, (list, tuple)) else int(
            feats.reshape(-1, feats.shape[-1]).shape[0])
        n_tokens = int((input_ids == self.image_token_id).sum()) if self.image_token_id is not None else -1
        if n_tokens != n_features:
            proc_img = getattr(self.processor, "image_processor", None)
            proc_desc = {k: getattr(proc_img, k) for k in ("patch_size", "merge_size", "size", "crop_size")
                         if proc_img is not None and hasattr(proc_img, k)}
            vcfg = getattr(self.model_config, "vision_config", None)
            model_desc = {k: getattr(vcfg, k) for k in ("patch_size", "spatial_merge_size", "image_size")
                          if vcfg is not None and hasattr(vcfg, k)}
            raise ImageTokenMismatchError(
                f"the processor inserted {n_tokens} image placeholder tokens but the model's vision tower "
                f"produced {n_features} image features. Processor image settings {proc_desc} do not match "
                f"the model's vision config {model_desc}: load the processor saved with this model."
            )
        return {"image": out}

    def _run(self, input_ids: Tensor, attention_mask: Tensor, vision: dict[str, Tensor],
             cache: Any = None) -> tuple[Any, Tensor]:
        """One full pass; returns the transformers output and each row's next RoPE position."""
        # Vision first: a processor/model mismatch must fail here with a clear message, not in RoPE code.
        mm = self._image_outputs(input_ids, vision) if vision else None
        positions, next_pos = self._positions(input_ids, attention_mask, vision)
        extra = {k: v for k, v in vision.items()
                 if k not in self._image_feature_args and k not in ("mm_token_type_ids", "pixel_attention_mask")}
        out = self._decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            **{self._cache_kwarg: cache},
            use_cache=cache is not None,
            mm_encoder_outputs=mm,
            **extra,
        )
        return out, next_pos

    def forward(self, input_ids: Tensor, attention_mask: Tensor, vision: dict[str, Tensor] | None = None) -> Tensor:
        """Final normalised hidden states for a batch.

        Args:
            input_ids: Token ids, shape ``(B, L)``.
            attention_mask: 1 for tokens, 0 for padding (left or right), shape ``(B, L)``.
            vision: Processor image outputs (empty or None for text-only input).

        Returns:
            Hidden states ``e``, shape ``(B, L, d)``.
        """
        out, _ = self._run(input_ids, attention_mask, vision or {})
        return out.last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        """Base-model next-token logits ``lm_head(e)``, shape ``(..., V)``."""
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ incremental decoding
    def prefill(self, input_ids: Tensor, attention_mask: Tensor,
                vision: dict[str, Tensor] | None = None) -> tuple[Tensor, DecodeState]:
        """Encode (left-padded) prompts and open a KV cache for decoding.

        Args:
            input_ids: Prompt ids, left-padded, shape ``(B, P)``.
            attention_mask: Prompt mask, shape ``(B, P)``.
            vision: Processor image outputs.

        Returns:
            The prompt hidden states ``(B, P, d)`` and the state to continue from.
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model_config.get_text_config())
        out, next_pos = self._run(input_ids, attention_mask, vision or {}, cache=cache)
        state = DecodeState(cache=_returned_cache(out), attention_mask=attention_mask, next_position=next_pos)
        return out.last_hidden_state, state

    def step(self, token_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Append one token per row and return its hidden state.

        Args:
            token_ids: The new tokens, shape ``(B,)`` or ``(B, 1)``.
            state: The state returned by :meth:`prefill` or a previous :meth:`step`.

        Returns:
            Hidden states of the new tokens ``(B, 1, d)`` and the updated state.
        """
        token_ids = token_ids.view(-1, 1)
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(token_ids.shape)], dim=1)
        pos = state.next_position.view(-1, 1)  # (B, 1)
        if self._uses_mrope:
            pos = pos.unsqueeze(0).expand(3, -1, -1)  # (3, B, 1)
        out = self._decoder(input_ids=token_ids, attention_mask=mask, position_ids=pos,
                            use_cache=True, **{self._cache_kwarg: state.cache})
        new_state = DecodeState(cache=_returned_cache(out), attention_mask=mask, next_position=state.next_position + 1)
        return out.last_hidden_state, new_state

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, vision: dict[str, Tensor] | None = None, *,
                 max_new_tokens: int = 64, do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, num_return_sequences: int = 1, min_new_tokens: int = 0) -> Tensor:
        """Token-level generation with transformers' ``generate`` (the token RL baseline's rollouts).

        Image-segment tokens are suppressed (a reply never contains one); generation stops at the
        end-of-turn ids.

        Args:
            input_ids: Left-padded prompts ``(B, P)``.
            attention_mask: Prompt mask ``(B, P)``.
            vision: Processor image outputs.
            max_new_tokens: Length limit.
            do_sample: Sample (else greedy).
            temperature: Sampling temperature.
            top_k: Top-k truncation (0: none).
            top_p: Nucleus truncation (1.0: none).
            num_return_sequences: Samples per prompt (rows grouped by prompt).
            min_new_tokens: End-of-turn ids are suppressed before this many new tokens (0: no minimum;
                equal to ``max_new_tokens``: replies of exactly that length).

        Returns:
            The generated ids ``(B * num_return_sequences, T)``, padded with the pad id after the end.
        """
        if min_new_tokens < 0:
            raise ValueError(f"Backbone.generate: min_new_tokens must be >= 0, got {min_new_tokens}")
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **(vision or {}),
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature if do_sample else None,
            top_k=top_k if (do_sample and top_k) else None, top_p=top_p if do_sample else None,
            num_return_sequences=num_return_sequences, min_new_tokens=min_new_tokens or None,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id, suppress_tokens=self.image_segment_token_ids or None, use_cache=True,
        )
        return out[:, input_ids.shape[1]:]

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model without its LoRA adapters (the KL reference of a LoRA-trained backbone)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Save model (LoRA adapters merged) and processor so :meth:`from_pretrained` reloads them."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model = self.model
        if self.config.trainable == "lora":
            model = merge_lora(model)
        model.save_pretrained(out_dir)
        if self.processor is not None:
            self.processor.save_pretrained(out_dir)


def _returned_cache(out: Any) -> Any:
    """The KV cache a decoder returned (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class _NoTokenizer:
    """Stand-in used when a Backbone has no processor: ids then come from the model config only."""

    pad_token_id = None
    eos_token_id = None

    def __len__(self) -> int:
        return 1 << 31


def merge_lora(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` whose injected LoRA layers are merged into their base weights."""
    import copy

    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.get_base_layer())
    return merged
