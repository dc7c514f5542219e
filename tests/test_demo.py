"""The README's main job, ``python -m structgp demo``, runs end to end (at the small size) and reports what
it fitted: each problem's plan, the seed-002 model at its reduced size, and the plot."""

import structgp.demo as demo


def test_demo_runs_at_the_small_size(tmp_path, capsys):
    assert demo.main(["--size", "small", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "identity lift: Kronecker + ScaledIdentity, answered by eigen" in out
    assert out.count("RMSE of the posterior mean") == 3
    rmse = [float(line.rsplit(":", 1)[1]) for line in out.splitlines() if "RMSE of the posterior mean" in line]
    assert all(r < 0.2 for r in rmse), rmse
    assert (tmp_path / "demo_predictions.png").exists()
