import pytest

from latent_mca.eval.results import _table, aggregate, paired_rows, phase_rows


def summary(ratio_id, ratio_ood, gain, codes):
    def block(r):
        return {"ratio": {"mean": r, "std": 0.01}, "diversity": {"semantic_diversity": 1.0 + r, "distinct_2": r / 2}}

    return {"eval": [{"agent": "SFT", "test_id": block(ratio_id), "test_ood": block(ratio_ood)}],
            "phases": {"inverse_dynamics": {"metrics": {"val/mm_wm_gain": gain, "val/codes_used": codes}},
                       "inverse_dynamics_no_text": {"metrics": {"val/mm_wm_gain": gain / 2}}}}


def test_aggregate_reports_mean_and_std_over_seeds():
    rows = aggregate({0: summary(0.8, 0.6, 0.1, 40), 1: summary(0.9, 0.7, 0.2, 60)})
    (row,) = rows
    assert row["agent"] == "SFT" and row["seeds"] == 2
    mean, std = row["test_id/ratio"]
    assert mean == pytest.approx(0.85) and std == pytest.approx(0.0707107, rel=1e-5)
    assert row["test_ood/diversity"][0] == pytest.approx(1.65)
    table = _table(rows, "ratio")
    assert table.splitlines()[-1].split("|")[3:6] == [" 0.850 ± 0.071 ", " 0.650 ± 0.071 ", " 0.750   "]


def test_phase_rows_cover_every_ablation_and_mark_missing_metrics():
    rows = phase_rows({0: summary(0.8, 0.6, 0.1, 40), 1: summary(0.9, 0.7, 0.3, 60)}, "inverse_dynamics")
    assert [r["phase"] for r in rows] == ["inverse_dynamics", "inverse_dynamics_no_text"]
    assert rows[0]["val/mm_wm_gain"] == "0.200 ± 0.141" and rows[0]["val/codes_used"].startswith("50.000")
    assert rows[1]["val/mm_wm_gain"] == "0.100 ± 0.071" and rows[1]["val/codes_used"].startswith("n/a")


def test_paired_rows_subtract_the_baseline_of_the_same_seed():
    def two_agents(sft, rl):
        out = summary(sft, sft, 0.1, 40)
        out["eval"].append({"agent": "RL", "test_id": {"ratio": {"mean": rl}}})
        return out

    (row,) = paired_rows({0: two_agents(0.5, 0.6), 1: two_agents(0.9, 0.8), 2: two_agents(0.7, 0.75)}, "SFT")
    assert row["agent"] == "RL" and row["test_id"] == "+0.017 ± 0.104" and row["test_id seeds better"] == "2/3"
    assert row["test_ood"] == "n/a"  # the RL agent was not evaluated there


def write_rewards(run, phase, rewards):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "logs" / phase / "version_0"))
    for step, value in enumerate(rewards):
        writer.add_scalar("train/reward", value, step)
    writer.close()


def test_reward_vs_control_pairs_steps_over_the_second_half(tmp_path):
    from latent_mca.eval.results import reward_vs_control

    runs = {s: tmp_path / f"seed{s}" for s in (0, 1)}
    for s, run in runs.items():
        control = [0.5, 0.9, 0.1, 0.7]  # prompt difficulty: shared by the phase on the same seed
        write_rewards(run, "latent_rl_control", control)
        write_rewards(run, "latent_rl", [c + d for c, d in zip(control, (0.0, 0.0, 0.1 * (s + 1), 0.1 * (s + 1)))])
        write_rewards(run, "latent_rl_no_text", control)  # an ablation: another start, not compared
    (row,) = reward_vs_control(runs, ["latent_rl", "latent_rl_control", "latent_rl_no_text"])
    assert row["phase"] == "latent_rl" and row["gain over control"] == "0.150 ± 0.071"
    assert row["seeds with a gain"] == "2/2" and row["control reward"] == "0.400 ± 0.000"
