"""``lightning-picard eval``: CLIP R-Precision and CLIP-FID on turntables, with a tiny random CLIP built from config
(no weights: the numbers are not meaningful, the computation and the command are what is tested)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_clip_tokenizer

from recipes.cli import main
from recipes.eval.clip_quality import (
    ClipImageFeatures,
    clip_fid,
    clip_similarity,
    load_clip,
    r_precision,
    read_video,
)
from recipes.export.video import save_image, write_video


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    common = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={
            **common,
            "vocab_size": vocab_size,
            "max_position_embeddings": 16,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        vision_config={**common, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fake_run(folder: Path, prompt: str, seed: int, frames: int = 6) -> Path:
    """A run folder as `fit` + `test` leave it: run.json with the prompt and a turntable."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"prompt": prompt, "steps": 6}))
    generator = torch.Generator().manual_seed(seed)
    video = torch.rand(frames, 24, 24, 3, generator=generator)
    write_video(folder / "test" / "turntable-step000006.mp4", video)
    return folder


def test_r_precision_counts_frames_closest_to_their_own_prompt():
    text = torch.eye(3, 4)  # prompts a, b, c along axes 0, 1, 2
    run_a = torch.tensor([[1.0, 0.1, 0, 0], [0.2, 1.0, 0, 0]])  # one frame nearest a, one nearest b
    run_b = torch.tensor([[0.0, 2.0, 0.1, 0]])
    assert r_precision([run_a, run_b, run_b], ["a", "b", "c"], text) == [0.5, 1.0, 0.0]
    with pytest.raises(ValueError, match="distinct prompts"):
        r_precision([run_a], ["a"], text)


def test_clip_similarity_is_the_mean_cosine_with_the_runs_own_prompt():
    text = torch.eye(3, 4) * 2.0  # unnormalised on purpose
    run_a = torch.tensor([[3.0, 0, 0, 0], [0.0, 1.0, 0, 0]])  # cosine 1 and 0 with a
    run_c = torch.tensor([[0.0, 0, 1.0, 1.0]])  # cosine 1/√2 with c
    values = clip_similarity([run_a, run_c], ["a", "c"], text[[0, 2]])
    assert values == pytest.approx([0.5, 2**-0.5])


def test_clip_fid_is_zero_for_the_same_images_and_grows_with_a_shift(tiny_clip):
    features = load_clip(str(tiny_clip)).features
    assert isinstance(features, ClipImageFeatures) and features.num_features == 16
    images = torch.rand(24, 3, 20, 28, generator=torch.Generator().manual_seed(1))
    assert clip_fid(features, images, images) == pytest.approx(0.0, abs=1e-3)
    assert clip_fid(features, images, (images * 0.3).clamp(0, 1)) > clip_fid(features, images, images) + 1e-3


def test_eval_writes_a_table_for_several_runs(tiny_clip, tmp_path, monkeypatch, capsys):
    runs = [fake_run(tmp_path / "a", "a red apple", 1), fake_run(tmp_path / "b", "a blue car", 2)]
    reference = tmp_path / "reference"
    for i, frame in enumerate(read_video(runs[0] / "test" / "turntable-step000006.mp4")):
        save_image(reference / f"{i:03d}.png", frame.permute(1, 2, 0))
    monkeypatch.chdir(tmp_path)
    rows = main(["eval", *map(str, runs), "--clip", str(tiny_clip), "--reference-images", str(reference)])
    assert [r["run"] for r in rows] == [str(runs[0]), str(runs[1]), "all"]
    assert [r["frames"] for r in rows] == [6, 6, 12]
    clip = load_clip(str(tiny_clip))
    frames = [read_video(run / "test" / "turntable-step000006.mp4") for run in runs]
    expected = r_precision(
        [clip.image_embeddings(f) for f in frames],
        ["a red apple", "a blue car"],
        clip.text_embeddings(["a red apple", "a blue car"]),
    )
    assert [r["clip_r_precision"] for r in rows[:2]] == pytest.approx(expected)
    similarity = clip_similarity(
        [clip.image_embeddings(f) for f in frames],
        ["a red apple", "a blue car"],
        clip.text_embeddings(["a red apple", "a blue car"]),
    )
    assert [r["clip_similarity"] for r in rows] == pytest.approx([*similarity, sum(similarity) / 2])
    assert rows[0]["clip_fid"] == pytest.approx(0.0, abs=1e-2)  # the reference is run a's own frames
    assert rows[1]["clip_fid"] > rows[0]["clip_fid"]
    with (tmp_path / "quality.csv").open(newline="") as file:
        table = list(csv.DictReader(file))
    assert [t["prompt"] for t in table[:2]] == ["a red apple", "a blue car"]
    markdown = (tmp_path / "quality.md").read_text()
    assert "| run | prompt | step | frames | clip_r_precision | clip_similarity | clip_fid |" in markdown
    assert markdown in capsys.readouterr().out


def test_a_run_without_turntable_says_to_run_test_first(tiny_clip, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"prompt": "a cat"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run), "--clip", str(tiny_clip)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "lightning-picard test --ckpt_path" in error


def test_a_missing_clip_model_says_what_to_pass(tmp_path, capsys):
    run = fake_run(tmp_path / "run", "a cat", 3)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run), "--clip", str(tmp_path / "no-such-clip")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "pass --clip a local folder" in error
