"""Stage 2: RL in the latent action space (GRPO, Dr.GRPO, DAPO, BNPO over 128 codes instead of the vocabulary).

Per training step: the latent agent generates ``G`` replies per prompt (codes sampled from the policy, tokens
from the frozen world model), a reward function scores them, group-relative advantages weight the clipped
policy-gradient loss over the codes' log-probabilities, and only the policy is updated. The update reuses
the backbone states recorded during the rollout: the backbone never runs in the backward pass. The KL
reference (``rl.beta > 0``) is a frozen copy of the policy alone.

Launch (the algorithm is one key)::

    python -m latent_mca fit --config configs/demo/latent_rl.yaml --model.init_args.rl.algorithm=dapo
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from latent_mca.batch import DialogueBatch
from latent_mca.models import (
    BackboneConfig,
    Codebook,
    CodebookConfig,
    CrossModalProjector,
    InverseDynamics,
    InverseDynamicsConfig,
    LatentPolicy,
    LatentPolicyConfig,
    ProjectorConfig,
    WorldModel,
    WorldModelConfig,
    code_logprobs,
    code_usage_stats,
)
from latent_mca.models.agent import LatentAgent, LatentRollout, SamplingConfig
from latent_mca.phases.base import PhaseModule
from latent_mca.rl.dynamic import GroupRefill, group_rows
from latent_mca.rl.rewards.base import RewardFunction
from latent_mca.rl.update import RLConfig, advantages_for_update, decode_completions, log_step, optimise, score_rollouts

FROZEN = ("codebook", "world_model")
CARRIED = ("projector", "inverse")  # exported unchanged so the next reader has the whole latent space
LOGP_FLOOR = -30.0  # codes outside a truncated (top-k/top-p) support have logp -inf; keep the loss finite


class LatentRLModule(PhaseModule):
    """GRPO-family RL of the latent policy with a frozen world model.

    Args:
        backbone: The frozen VLM backbone (the SFT model the latent space was built on).
        init_from: Export of the behaviour-cloning phase (policy, codebook, world model).
        reward: Reward function over completions (e.g. the synthetic world's judge, an LLM judge).
        rl: Algorithm and sampling settings.
        token_temperature: World-model token temperature in rollouts (0: greedy, as in the paper).
        optimizer: Optimiser factory (the policy's parameters only).
        lr_scheduler: Optional scheduler factory.
        export_dir: Where the export is written at the end of ``fit``.
    """

    phase = "latent_rl"

    def __init__(self, backbone: BackboneConfig, init_from: str, reward: RewardFunction, rl: RLConfig | None = None,
                 token_temperature: float = 0.0, optimizer: OptimizerCallable = torch.optim.AdamW,
                 lr_scheduler: LRSchedulerCallable | None = None, export_dir: str | None = None) -> None:
        super().__init__(backbone, optimizer, lr_scheduler, init_from, export_dir)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "reward"])
        self.automatic_optimization = False
        self.reward = reward
        self.rl = rl or RLConfig()
        self.sampling = SamplingConfig(max_new_tokens=self.rl.max_new_tokens, temperature=self.rl.temperature,
                                       top_k=self.rl.top_k, top_p=self.rl.top_p, token_temperature=token_temperature)
        self.policy: LatentPolicy | None = None
        self.ref_policy: LatentPolicy | None = None
        # DAPO dynamic sampling: informative groups wait here across steps until an update's worth is drawn.
        self.refill_buffer: GroupRefill[LatentRollout] | None = None

    # ------------------------------------------------------------------ construction
    def build_modules(self) -> None:
        """Load the BC export; freeze everything but the policy; copy the policy as the KL reference."""
        parent = self.parent
        if parent is None or not parent.has("policy"):
            raise ValueError(f"init_from={self.init_from!r} holds no policy: point it at a BC export")
        self.policy = parent.build("policy", LatentPolicyConfig, LatentPolicy)
        self.codebook = parent.build("codebook", CodebookConfig, Codebook).requires_grad_(False)
        self.world_model = parent.build("world_model", WorldModelConfig, WorldModel).requires_grad_(False)
        self.carried = nn.ModuleDict()
        if parent.has("projector"):
            self.carried["projector"] = parent.build("projector", ProjectorConfig, CrossModalProjector)
        if parent.has("inverse"):
            self.carried["inverse"] = parent.build("inverse", InverseDynamicsConfig, InverseDynamics)
        self.carried.requires_grad_(False)
        if self.rl.beta > 0:
            # A copy of the policy as loaded from init_from: on resume the checkpoint restores self.policy
            # only, so the reference stays the initial policy.
            self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False).eval()
        if self.rl.dynamic_sampling:
            self.refill_buffer = GroupRefill(self.rl.num_generations, self.rl.dynamic_sampling_max_batches,
                                             select=_select_groups, cat=LatentRollout.cat)

    @property
    def agent(self) -> LatentAgent:
        """Return the generating agent: a view over the modules, not a registered submodule."""
        return LatentAgent(self.backbone, self.policy, self.codebook, self.world_model)

    def train(self, mode: bool = True) -> LatentRLModule:
        """Frozen modules stay in eval mode."""
        super().train(mode)
        for module in (getattr(self, n, None) for n in (*FROZEN, "ref_policy", "carried")):
            if module is not None:
                module.eval()
        return self

    def export_modules(self) -> dict[str, tuple[nn.Module, Any]]:
        """The trained policy with the (unchanged) latent space it acts in."""
        modules = {name: (m, m.config) for name, m in self.carried.items()}
        modules.update({n: (getattr(self, n), getattr(self, n).config) for n in (*FROZEN, "policy")})
        return modules

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Besides the frozen backbone, the reference copy is not stored."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("ref_policy.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The reference is rebuilt from init_from; check the rest."""
        for key, value in list(self.state_dict().items()):
            if key.startswith("ref_policy."):
                checkpoint["state_dict"].setdefault(key, value)
        super().on_load_checkpoint(checkpoint)

    # ------------------------------------------------------------------ training
    def code_logp(self, policy: LatentPolicy, rollout: LatentRollout) -> Tensor:
        """Log-probabilities ``(N, T)`` of the rollout's codes under ``policy`` (from the recorded states).

        Each prompt is encoded once for its ``G`` samples (:meth:`LatentRollout.policy_logits`): the same values
        and gradients as scoring every row's prompt + completion, at a fraction of the work.
        """
        logits = rollout.policy_logits(policy)  # (N, T, K): the backbone is not run again
        logp = code_logprobs(logits, rollout.codes, self.rl.temperature, self.rl.top_k, self.rl.top_p)
        return logp.clamp_min(LOGP_FLOOR)

    def training_step(self, batch: DialogueBatch, batch_idx: int) -> None:
        """Rollout, reward, advantages, then ``rl.num_iterations`` policy updates.

        Under DAPO dynamic sampling a step may only sample: its informative groups wait in
        :attr:`refill_buffer` until a batch worth of them (or ``rl.dynamic_sampling_max_batches`` batches)
        has been drawn.
        """
        cfg, g = self.rl, self.rl.num_generations
        self.policy.eval()
        rollout = self.agent.generate(batch.prompt, self.sampling, num_samples=g)
        self.policy.train()
        texts = decode_completions(self.backbone.tokenizer, rollout.tokens, rollout.mask)
        rewards = score_rollouts(self.reward, batch, texts, g).to(self.device)
        update = advantages_for_update(self, cfg, self.refill_buffer, rollout, rewards, rollout.lengths,
                                       rollout.finished, batch.batch_size)
        if update is None:
            return
        rollout, adv = update
        rows = batch.batch_size * g
        mask = rollout.mask * adv.row_mask[:, None].to(rollout.mask)  # (N, T)
        old = rollout.code_logp.clamp_min(LOGP_FLOOR)
        ref = None
        if self.ref_policy is not None:
            with torch.no_grad():
                ref = self.code_logp(self.ref_policy, rollout)
        loss, stats = optimise(self, lambda: self.code_logp(self.policy, rollout), old, ref, adv, mask, cfg)
        log_step(self, loss, adv, stats, self.reward, rows)
        usage = code_usage_stats(rollout.codes, self.codebook.num_codes, rollout.mask.bool())
        self.log_dict({"train/codes_used": usage["used"], "train/code_perplexity": usage["perplexity"]},
                      batch_size=rows)


def _select_groups(rollout: LatentRollout, groups: Tensor) -> LatentRollout:
    return rollout.select(group_rows(groups, rollout.num_samples))
