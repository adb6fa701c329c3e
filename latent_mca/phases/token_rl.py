"""The token-level RL baseline: the same GRPO-family algorithms over the vocabulary, training the backbone.

Rollouts sample tokens with transformers' ``generate``; the update recomputes the tokens' log-probabilities
with a full backbone forward pass (which latent RL avoids). Which backbone parameters train is
``backbone.trainable`` (``all``, ``top_n`` or ``lora``); the KL reference is a frozen copy of the backbone,
or the same backbone with its adapters disabled under LoRA.

Launch::

    python -m latent_mca fit --config configs/demo/token_rl.yaml --model.init_args.rl.algorithm=dr_grpo
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
import torch.nn.functional as F
from torch import Tensor, nn

from latent_mca.batch import ChatInputs, DialogueBatch
from latent_mca.models import Backbone, BackboneConfig, processed_logprobs
from latent_mca.phases.base import PhaseModule
from latent_mca.rl.advantages import completion_mask_from_eos
from latent_mca.rl.dynamic import GroupRefill, group_rows
from latent_mca.rl.rewards.base import RewardFunction
from latent_mca.rl.update import RLConfig, advantages_for_update, decode_completions, log_step, optimise, score_rollouts

LOGP_FLOOR = -30.0


class TokenRLModule(PhaseModule):
    """GRPO-family RL over tokens.

    Args:
        backbone: The VLM to train; ``trainable`` must be ``all``, ``top_n`` or ``lora``.
        reward: Reward function over completions.
        rl: Algorithm and sampling settings.
        optimizer: Optimiser factory.
        lr_scheduler: Optional scheduler factory.
        export_dir: Where the trained checkpoint is saved at the end of ``fit``.
    """

    phase = "token_rl"

    def __init__(self, backbone: BackboneConfig, reward: RewardFunction, rl: RLConfig | None = None,
                 optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None,
                 export_dir: str | None = None) -> None:
        if backbone.trainable == "none":
            raise ValueError("TokenRLModule trains the backbone: set backbone.trainable to all, top_n or lora")
        super().__init__(backbone, optimizer, lr_scheduler, None, export_dir)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "reward"])
        self.automatic_optimization = False
        self.reward = reward
        self.rl = rl or RLConfig()
        self.ref_backbone: Backbone | None = None
        # DAPO dynamic sampling: informative groups wait here across steps until an update's worth is drawn.
        self.refill_buffer: GroupRefill[_TokenRollout] | None = None

    def build_modules(self) -> None:
        """Keep a frozen reference unless LoRA can simply switch its adapters off."""
        if self.rl.beta > 0 and self.backbone_config.trainable != "lora":
            ref = copy.deepcopy(self.backbone)
            ref.config = dataclasses.replace(ref.config, trainable="none")  # Backbone.train() keeps it in eval
            self.ref_backbone = ref.requires_grad_(False).eval()
        if self.rl.dynamic_sampling:
            g, pad = self.rl.num_generations, self.backbone.tokenizer.pad_token_id
            self.refill_buffer = GroupRefill(g, self.rl.dynamic_sampling_max_batches,
                                             select=lambda r, groups: r.select(groups, g),
                                             cat=lambda parts: _TokenRollout.cat(parts, 0 if pad is None else pad))

    def export_targets(self) -> list[nn.Module]:
        """The backbone is what this phase exports."""
        return [self.backbone]

    def export(self, out_dir: Path) -> None:
        """Save the trained backbone (LoRA merged) with its processor."""
        self.backbone.save_pretrained(out_dir)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The reference is rebuilt from the initial checkpoint, never stored."""
        super().on_save_checkpoint(checkpoint)
        for key in [k for k in checkpoint["state_dict"] if k.startswith("ref_backbone.")]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Re-insert the (unchanged) reference weights before the strict check."""
        for key, value in self.state_dict().items():
            if key.startswith("ref_backbone."):
                checkpoint["state_dict"].setdefault(key, value)
        super().on_load_checkpoint(checkpoint)

    @contextlib.contextmanager
    def reference(self) -> Iterator[Backbone]:
        """The frozen reference model."""
        if self.ref_backbone is not None:
            yield self.ref_backbone
        else:
            with self.backbone.adapters_disabled():
                yield self.backbone

    def token_logp(self, backbone: Backbone, full: ChatInputs, prompt_len: int, completion: Tensor) -> Tensor:
        """Log-probabilities ``(N, T)`` of the completion tokens (a full backbone forward pass)."""
        hidden = backbone(full.input_ids, full.attention_mask, full.vision)
        t = completion.shape[1]
        logits = backbone.lm_head(hidden[:, prompt_len - 1: prompt_len - 1 + t])  # (N, T, V)
        logp = processed_logprobs(logits, self.rl.temperature, self.rl.top_k, self.rl.top_p)
        return logp.gather(-1, completion.unsqueeze(-1)).squeeze(-1).clamp_min(LOGP_FLOOR)

    def training_step(self, batch: DialogueBatch, batch_idx: int) -> None:
        """Rollout with ``generate``, reward, advantages, then ``rl.num_iterations`` backbone updates.

        Under DAPO dynamic sampling a step may only sample (see :class:`~latent_mca.rl.dynamic.GroupRefill`).
        """
        cfg, g, prompt = self.rl, self.rl.num_generations, batch.prompt
        completion = self.backbone.generate(prompt.input_ids, prompt.attention_mask, prompt.vision,
                                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            top_k=cfg.top_k, top_p=cfg.top_p, num_return_sequences=g)
        is_eos = torch.isin(completion, torch.tensor(self.backbone.eos_token_ids, device=completion.device))
        mask = completion_mask_from_eos(is_eos).to(completion.dtype)  # (N, T)
        finished = (is_eos & mask.bool()).any(-1)
        texts = decode_completions(self.backbone.tokenizer, completion, mask)
        rewards = score_rollouts(self.reward, batch, texts, g).to(self.device)
        update = advantages_for_update(self, cfg, self.refill_buffer, _TokenRollout(prompt, completion, mask),
                                       rewards, mask.sum(-1), finished, batch.batch_size)
        if update is None:
            return
        (prompt, completion, mask), adv = update
        rows = batch.batch_size * g
        loss_mask = mask * adv.row_mask[:, None].to(mask)
        rep = prompt.repeat_interleave(g)
        full = _append(rep, completion, mask)
        p = prompt.input_ids.shape[1]
        old = ref = None
        with torch.no_grad():
            if cfg.num_iterations > 1:
                old = self.token_logp(self.backbone, full, p, completion)
            if cfg.beta > 0:
                with self.reference() as reference:
                    ref = self.token_logp(reference, full, p, completion)
        loss, stats = optimise(self, lambda: self.token_logp(self.backbone, full, p, completion), old, ref, adv,
                               loss_mask, cfg)
        log_step(self, loss, adv, stats, self.reward, rows)


class _TokenRollout(NamedTuple):
    """What dynamic sampling keeps of a token rollout: prompts ``(B, P)`` and completions ``(B * G, T)``."""

    prompt: ChatInputs
    completion: Tensor
    mask: Tensor

    def select(self, groups: Tensor, g: int) -> _TokenRollout:
        rows = group_rows(groups, g)  # (groups * G,)
        return _TokenRollout(self.prompt.select(groups), self.completion[rows], self.mask[rows])

    @staticmethod
    def cat(parts: list[_TokenRollout], pad_token_id: int) -> _TokenRollout:
        t = max(r.completion.shape[1] for r in parts)
        completion = torch.cat([F.pad(r.completion, (0, t - r.completion.shape[1]), value=pad_token_id)
                                for r in parts])  # (N, T): right-padded, masked
        mask = torch.cat([F.pad(r.mask, (0, t - r.mask.shape[1])) for r in parts])
        return _TokenRollout(ChatInputs.cat([r.prompt for r in parts], pad_token_id), completion, mask)


def _append(prompt: ChatInputs, completion: Tensor, mask: Tensor) -> ChatInputs:
    """Prompt + completion as one left-padded sequence (image token types extended with text)."""
    vision = dict(prompt.vision)
    if "mm_token_type_ids" in vision:
        vision["mm_token_type_ids"] = torch.cat([vision["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    return ChatInputs(input_ids=torch.cat([prompt.input_ids, completion], dim=1),
                      attention_mask=torch.cat([prompt.attention_mask, mask.to(prompt.attention_mask)], dim=1),
                      vision=vision)
