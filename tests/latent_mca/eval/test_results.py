import pytest

from latent_mca.eval.results import _table, aggregate, phase_rows


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
