from lightning_picard.demo import run


def test_demo_is_exact_at_threshold_zero_and_faster_with_a_threshold(capsys):
    results = run(steps=40, devices=2, window_size=4, threshold=1e-5)
    assert results["exact_distance"] == 0.0
    assert results["adaptive_rounds"] < results["exact_rounds"] <= 40
    assert results["adaptive_distance"] < results["seed_spread"]
    assert "bit-identical" in capsys.readouterr().out
