"""Prompt corpora (JSON prompt libraries, text files), their bad inputs, the pooled-embedding cache, per-step draws,
and the weight-free pieces of amortized text-to-3D (captioned procedural objects, their priors, Hyper-iNGP)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from recipes.data.procedural_set import MAX_OBJECTS, object_of_caption, procedural_objects
from recipes.data.prompt_corpus import PromptCorpusError, draw_prompts, load_prompt_corpus
from recipes.geometry.amortized import AmortizedGenerator, ConditionedField, FieldSlot
from recipes.geometry.hashgrid import HashGridConfig
from recipes.geometry.hyper_ingp import HyperINGP, HyperINGPConfig
from recipes.guidance.closed_form import ClosedFormPrior
from recipes.guidance.corpus_embeddings import CaptionHashEncoder, corpus_embeddings
from recipes.guidance.multi_object import MultiObjectPrior, object_views

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_library(tmp_path, **splits):
    library = {"train": ["a", "b"], "val": ["a"], "test": ["b"], **splits}
    path = tmp_path / "library.json"
    path.write_text(json.dumps(library))
    return path


def test_a_json_library_keeps_its_splits_and_a_text_file_is_all_three(tmp_path):
    corpus = load_prompt_corpus(write_library(tmp_path, val=["c"]))
    assert (corpus.train, corpus.val, corpus.test) == (("a", "b"), ("c",), ("b",))
    assert corpus.all_prompts() == ["a", "b", "c"]
    text = tmp_path / "prompts.txt"
    text.write_text("  a ripe strawberry \n\na pineapple\n")
    corpus = load_prompt_corpus(text)
    assert corpus.train == corpus.val == corpus.test == ("a ripe strawberry", "a pineapple")


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"val": []}, "the 'val' split is empty; give it at least one prompt"),
        ({"train": ["a", "b", "a"]}, "train[2] 'a' repeats train[0]; remove the duplicate"),
        ({"test": ["b", 3]}, "test[1] is a int, not a prompt"),
        ({"train": ["a", "  "]}, "train[1] is an empty prompt"),
        ({"val": "a"}, "'val' is a str, not a list of prompts"),
    ],
)
def test_bad_library_content_is_one_line_saying_what_to_do(tmp_path, splits, message):
    with pytest.raises(PromptCorpusError, match=r"library\.json") as error:
        load_prompt_corpus(write_library(tmp_path, **splits))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_keys_invalid_json_and_unreadable_files(tmp_path):
    path = tmp_path / "library.json"
    path.write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(PromptCorpusError, match=r"has no 'val', 'test' list; a prompt library is \{"):
        load_prompt_corpus(path)
    path.write_text('{"train": ["a",]}')
    with pytest.raises(PromptCorpusError, match=r"is not valid JSON \(line 1, column"):
        load_prompt_corpus(path)
    with pytest.raises(
        PromptCorpusError, match=r"missing.json cannot be read \(No such file or directory\); pass"
    ):
        load_prompt_corpus(tmp_path / "missing.json")
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n\na dog\na cat\n")
    with pytest.raises(PromptCorpusError, match="line 4 'a cat' repeats line 1"):
        load_prompt_corpus(text)
    text.write_text("\n\n")
    with pytest.raises(PromptCorpusError, match="the 'train' split is empty"):
        load_prompt_corpus(text)


def test_the_cache_computes_each_prompt_once_and_warns_about_long_prompts(tmp_path, monkeypatch):
    encoder = CaptionHashEncoder(embedding_dim=8, max_tokens=5)
    calls: list[list[str]] = []
    load = encoder.load

    def counting_load():
        encode = load()
        return lambda prompts: (calls.append(list(prompts)), encode(prompts))[1]

    monkeypatch.setattr(encoder, "load", counting_load)
    long = "one two three four five six seven"
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) are longer than the 5 tokens .* truncated"):
        first = corpus_embeddings(["a cat", long], encoder, tmp_path, batch_size=1, progress=False)
    assert first.computed == 2 and calls == [["a cat"], [long]]
    again = corpus_embeddings(["a dog", long, "a cat"], encoder, tmp_path, progress=False)
    assert again.computed == 1 and calls[-1] == ["a dog"]  # only the new prompt
    assert torch.equal(again.embeddings[1], first.embeddings[1]) and torch.equal(
        again.embeddings[2], first.embeddings[0]
    )
    assert corpus_embeddings(["a dog", long], encoder, tmp_path, progress=False).computed == 0
    assert len(calls) == 3
    assert torch.equal(first.embeddings[1], encoder.embed("one two three four five"))  # truncated to 5 words
    assert not torch.equal(first.embeddings[0], again.embeddings[0])  # distinct captions, distinct codes


def test_each_step_draws_its_prompts_from_its_generator_alone():
    def draw(seed: int, batch: int, n: int = 10) -> torch.Tensor:
        return draw_prompts(n, batch, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3, 4), draw(3, 4)) and not torch.equal(draw(3, 4), draw(4, 4))
    assert len(set(draw(3, 10).tolist())) == 10  # a subset when the corpus is large enough
    assert draw(3, 5, n=2).shape == (5,) and set(draw(3, 5, n=2).tolist()) <= {0, 1}


def test_the_procedural_objects_have_distinct_captions_shapes_and_colours():
    objects = procedural_objects(MAX_OBJECTS)
    captions = [o.caption for o in objects]
    assert len(set(captions)) == MAX_OBJECTS
    assert captions[:2] == ["a red sphere with yellow stripes", "a blue box with orange stripes"]
    assert object_of_caption(captions[5]).object == objects[5].object
    with pytest.raises(ValueError, match="is not the caption of a procedural object"):
        object_of_caption("a ripe strawberry")


def test_the_multi_object_prior_is_each_objects_own_prior():
    objects = [o.object for o in procedural_objects(3)]
    joint = MultiObjectPrior.from_objects(objects, height=8)
    from recipes.data.procedural import reference_cameras

    cameras = reference_cameras(height=8, width=8)
    own = ClosedFormPrior.from_cameras(objects[1].render(cameras).rgb * 2 - 1, cameras)
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([300, 700])
    views = cameras[[4, 20]]
    expected = own.predict_noise(x_t, t, views)
    assert torch.allclose(
        joint.predict_noise(x_t, t, object_views(torch.tensor([1, 1]), views)), expected, atol=1e-5
    )
    weights = joint.mixture_weights(x_t, t, None)  # unconditional: every object's references
    assert weights.shape == (2, 3 * 36)


def tiny_generator(**overrides) -> HyperINGP:
    encoding = HashGridConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.0)
    return HyperINGP(
        HyperINGPConfig(
            embedding_dim=6, hypernet_hidden=8, mlp_width=4, radius=1.0, encoding=encoding, **overrides
        )
    )


def test_hyper_ingp_predicts_the_decoders_from_the_embedding_and_starts_as_the_sphere():
    generator = tiny_generator()
    assert isinstance(generator, AmortizedGenerator) and generator.noise_dim == 0
    full = HyperINGP()  # ScaleDreamer's sizes
    assert sum(p.numel() for p in full.hypernet.parameters()) == 348_544
    assert full.hypernet.layers[-1].out_features == 4352
    points = torch.rand(50, 3) * 2 - 1
    a, b = generator.condition(torch.randn(6)), generator.condition(torch.randn(6))
    assert isinstance(a, ConditionedField)
    sphere = points.norm(dim=-1) - 0.5
    assert torch.allclose(a.sdf(points), sphere, atol=1e-3)  # the grid starts at ±1e-4
    with torch.no_grad():
        generator.encoding.tables.normal_()
    out_a, out_b = a(points), b(points)
    assert out_a.sdf.shape == (50,) and out_a.features.shape == (50, 3) and out_a.normal.shape == (50, 3)
    assert not torch.allclose(out_a.sdf, out_b.sdf)  # two prompts, two fields, one grid
    out_a.sdf.sum().backward()
    assert (
        generator.hypernet.layers[0].weight.grad.abs().sum() > 0
        and generator.encoding.tables.grad.abs().sum() > 0
    )
    with pytest.raises(ValueError, match="expects one pooled embedding"):
        generator.condition(torch.randn(7))
    slot = FieldSlot(radius=2.0)
    with pytest.raises(ValueError, match="same radius"), slot.holding(a):
        pass
