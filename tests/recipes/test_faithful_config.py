"""demo/dreamgaussian-faithful.yaml is the demo config with exactly the three measured changes (docs/benchmarks.md)."""

from pathlib import Path

import yaml

from recipes.cli import RecipeCLI

DEMO = Path(__file__).parents[2] / "recipes" / "configs" / "demo"


def test_faithful_config_is_the_demo_with_three_changes():
    demo = yaml.safe_load((DEMO / "dreamgaussian.yaml").read_text())
    faithful = yaml.safe_load((DEMO / "dreamgaussian-faithful.yaml").read_text())
    scene = demo["model"]["init_args"]["scene"]["init_args"]
    scene["learning_rates"]["spatial_lr_scale"] = 3.0
    scene["densification"]["end_step"] = -1
    demo["trainer"]["strategy"]["init_args"]["tolerance"] = 0.01
    assert faithful == demo


def test_faithful_config_builds_without_densification():
    cli = RecipeCLI(
        args=["-c", str(DEMO / "dreamgaussian-faithful.yaml")], run=False, save_config_callback=None
    )
    scene = cli.model.scene
    assert scene.learning_rates.spatial_lr_scale == 3.0
    assert not any(scene.density.schedule.densifies_at(step) for step in range(501))
