import pytest
import torch

from latent_mca.models import BackboneConfig
from latent_mca.phases.base import PhaseModule
from tests.helpers.latent import latent_modules


class LatentOnly(PhaseModule):
    """A phase holding a policy and a world model, built without a backbone (checkpoint hooks only)."""

    phase = "toy"

    def build_modules(self) -> None:
        torch.manual_seed(0)
        mods = latent_modules(16, layers=2)
        self.policy, self.world_model = mods["policy"], mods["world_model"]


def built() -> LatentOnly:
    module = LatentOnly(BackboneConfig(path="unused"))
    module.build_modules()
    return module


def to_legacy(state):
    """The layout before fused projections: q/k/v, gate/up and fc1/fc2 matrices."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn.qkv_proj.weight"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):  # as many kv heads as heads
                out[key.replace("qkv_proj", name)] = part
        elif key.endswith("gate_up_proj.weight"):
            gate, up = value.chunk(2)
            out[key.replace("gate_up_proj", "gate_proj")], out[key.replace("gate_up_proj", "up_proj")] = gate, up
        elif key.endswith("state_proj.weight"):
            code = state[key.replace("state_proj", "code_proj")]
            (gx, ux), (gc, uc) = value.chunk(2), code.chunk(2)
            out[key.replace("state_proj", "fc1")] = torch.cat([gx, gc], dim=1)
            out[key.replace("state_proj", "fc2")] = torch.cat([ux, uc], dim=1)
        elif not key.endswith("code_proj.weight"):
            out[key] = value
    return out


def test_a_checkpoint_of_the_former_layout_resumes():
    reference = built()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    legacy = to_legacy(state)
    assert any(k.endswith("q_proj.weight") for k in legacy) and any(k.endswith("fc1.weight") for k in legacy)
    resumed = LatentOnly(BackboneConfig(path="unused"))
    resumed.build_modules()
    with torch.no_grad():  # the load, not the seed, must set every weight
        for param in resumed.parameters():
            param.add_(1.0)
    checkpoint = {"state_dict": dict(legacy), "global_step": 3}
    resumed.on_load_checkpoint(checkpoint)  # keys converted, then checked: nothing reported missing
    resumed.load_state_dict(checkpoint["state_dict"], strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed.train_batches_seen == 3  # no batch count in the checkpoint: one batch per step


def test_a_checkpoint_missing_weights_is_refused_with_their_names():
    module = built()
    state = module.state_dict()
    del state["policy.head.weight"]
    with pytest.raises(RuntimeError, match="policy.head.weight"):
        module.on_load_checkpoint({"state_dict": state})
