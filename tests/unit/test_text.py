"""Class prompts and their open_clip embeddings (tiny text tower, real tokenizer), the memory and disk caches,
the error when CLIP weights cannot be had, and how the MASG-SAM config wires the text into the network."""

from __future__ import annotations

import json

import pytest
import torch

from lib.class_text import TINY_TEXT_WIDTH, ClassTextEmbedder, TextEncoderError, class_prompts
from lib.configs.masg_sam import MASGSamConfig
from lib.networks.sam_backbone import CheckpointError

BRAIN = ["white matter", "grey matter"]


# ---------------------------------------------------------------------------------------------- prompts


def test_class_prompts():
    assert class_prompts(BRAIN, "MR") == [
        "a MRI image of the background",
        "a MRI image of the white matter",
        "a MRI image of the grey matter",
    ]
    assert class_prompts(["liver"], "auto") == ["a medical image of the background", "a medical image of the liver"]
    assert class_prompts(["liver"], "CT") == ["a CT image of the background", "a CT image of the liver"]
    assert class_prompts(["liver"], "ct") == ["a CT image of the background", "a CT image of the liver"]
    assert class_prompts([], "MR") == ["a MRI image of the background"]
    assert class_prompts(["x"], "XA")[1] == "a medical image of the x"  # unknown modality code


# ------------------------------------------------------------------------------------------- embeddings


def test_tiny_embeddings_are_normalised():
    embedder = ClassTextEmbedder(tiny=True)
    emb = embedder.embed(class_prompts(BRAIN, "MR"))
    assert emb.shape == (3, TINY_TEXT_WIDTH)
    assert emb.dtype == torch.float32
    assert not emb.requires_grad
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # every class its own embedding
    assert not torch.allclose(emb[1], emb[2], atol=1e-3)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)


def test_real_tokenizer_is_used():
    """Names that differ give different embeddings; spellings the CLIP tokenizer normalises (case, runs of
    spaces) give the same one, which a tokenizer of its own (hash, byte codes) would not."""
    embedder = ClassTextEmbedder(tiny=True)
    a = embedder.embed(["a MRI image of the liver"])
    b = embedder.embed(["a MRI image of the kidney"])
    c = embedder.embed(["A mri  image OF the Liver"])
    assert embedder.encoder_loads == 3  # three label sets, none cached
    assert not torch.allclose(a, b, atol=1e-3)
    assert torch.allclose(a, c, atol=1e-6)


def test_tiny_embeddings_are_reproducible():
    prompts = class_prompts(BRAIN, "MR")
    rng = torch.get_rng_state()
    a = ClassTextEmbedder(tiny=True).embed(prompts)
    assert torch.equal(rng, torch.get_rng_state())  # seeded tower, global RNG untouched
    b = ClassTextEmbedder(tiny=True).embed(prompts)
    assert torch.equal(a, b)


def test_memory_cache_keyed_by_label_set():
    embedder = ClassTextEmbedder(tiny=True)
    assert embedder.encoder_loads == 0
    prompts = class_prompts(BRAIN, "MR")
    first = embedder.embed(prompts)
    assert embedder.encoder_loads == 1
    second = embedder.embed(list(prompts))
    assert second is first
    assert embedder.encoder_loads == 1

    other = embedder.embed(class_prompts(["white matter", "csf"], "MR"))
    assert embedder.encoder_loads == 2
    assert other.shape == first.shape
    assert torch.allclose(other[:2], first[:2], atol=1e-6)  # same prompts, same rows
    assert not torch.allclose(other[2], first[2], atol=1e-3)  # the renamed label changed
    # a different modality is a different label set too
    embedder.embed(class_prompts(BRAIN, "CT"))
    assert embedder.encoder_loads == 3
    assert embedder.embed(prompts) is first


def test_disk_cache(tmp_path):
    cache = tmp_path / "text_embeddings"
    prompts = class_prompts(BRAIN, "MR")
    writer = ClassTextEmbedder(tiny=True, cache_dir=str(cache))
    emb = writer.embed(prompts)
    assert writer.encoder_loads == 1
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("text_") and files[0].suffix == ".pt"
    assert not [f for f in files if f.name.endswith(".tmp")]

    reader = ClassTextEmbedder(tiny=True, cache_dir=str(cache))
    again = reader.embed(prompts)
    assert reader.encoder_loads == 0  # read from disk, no text tower built
    assert torch.equal(again, emb)

    # the disk cache really is what is read: a tampered file is returned as is
    torch.save(torch.zeros_like(emb), files[0])
    assert torch.count_nonzero(ClassTextEmbedder(tiny=True, cache_dir=str(cache)).embed(prompts)) == 0

    # another label set: another file
    reader.embed(class_prompts(["liver"], "MR"))
    assert reader.encoder_loads == 1
    assert len(list(cache.iterdir())) == 2


def test_cache_key_depends_on_the_clip_identity(tmp_path):
    cache = tmp_path / "text_embeddings"
    prompts = class_prompts(BRAIN, "MR")
    b16 = ClassTextEmbedder(clip_model="ViT-B-16", tiny=True, cache_dir=str(cache))
    b32 = ClassTextEmbedder(clip_model="ViT-B-32", tiny=True, cache_dir=str(cache))
    assert b16.identity != b32.identity
    assert b16._key(prompts) != b32._key(prompts)
    b16.embed(prompts)
    b32.embed(prompts)
    assert b32.encoder_loads == 1  # not served from b16's file
    assert len(list(cache.iterdir())) == 2
    # non-tiny embedders with other weights are other identities too (nothing is built here)
    real = ClassTextEmbedder(clip_model="ViT-B-16", clip_checkpoint="openai")
    other = ClassTextEmbedder(clip_model="ViT-B-16", clip_checkpoint="laion2b_s34b_b88k")
    assert len({b16._key(prompts), real._key(prompts), other._key(prompts)}) == 3
    assert b16.identity["clip_checkpoint"] is None and real.identity["clip_checkpoint"] == "openai"


def test_missing_clip_weights_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-dir" / "open_clip_model.safetensors"
    embedder = ClassTextEmbedder(clip_model="ViT-B-16", clip_checkpoint=str(missing), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(TextEncoderError) as info:
        embedder.embed(class_prompts(BRAIN, "MR"))
    message = str(info.value)
    assert "clip_checkpoint" in message
    assert "backbone tiny" in message
    assert str(missing) in message and "ViT-B-16" in message
    assert isinstance(info.value, CheckpointError)
    assert issubclass(TextEncoderError, CheckpointError)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing cached


# ------------------------------------------------------------------------------------------------ config


def _config(tmp_path, **conf) -> MASGSamConfig:
    config = MASGSamConfig()
    config.init("masg_sam", str(tmp_path / "model"), {"backbone": "tiny", **conf}, None)
    return config


def test_config_builds_network_with_class_text(tmp_path):
    config = _config(tmp_path, labels=json.dumps({"liver": 1}))
    assert config.prompts == ["a medical image of the background", "a medical image of the liver"]
    network = config.build_network()
    assert network.num_classes == 2
    text = dict(network.named_buffers())["class_text"]
    assert text.shape == (2, TINY_TEXT_WIDTH)
    assert torch.equal(text, config.text.embed(config.prompts))
    assert torch.equal(text, ClassTextEmbedder(tiny=True).embed(class_prompts(["liver"], "auto")))
    assert config.text.encoder_loads == 1
    assert list((tmp_path / "model" / "text_embeddings").glob("text_*.pt"))  # cached in the model dir
    assert network.hae is not None and network.bfe is not None and network.dsf is not None


def test_config_modality_reaches_the_prompts(tmp_path):
    config = _config(tmp_path, labels=json.dumps({"liver": 1}), modality="CT")
    assert config.prompts == ["a CT image of the background", "a CT image of the liver"]


def test_labels_change_prompts_and_adapter_config(tmp_path):
    one = _config(tmp_path, labels=json.dumps({"liver": 1}))
    two = _config(tmp_path, labels=json.dumps({"liver": 1, "spleen": 2}))
    assert two.prompts == [*one.prompts, "a medical image of the spleen"]
    a, b = one.model.adapter_config(), two.model.adapter_config()
    assert a["class_prompts"] == one.prompts and b["class_prompts"] == two.prompts
    assert a["masg_modules"] == ["hae", "bfe", "dsf"] == b["masg_modules"]
    assert a["labels"] == {"liver": 1} and b["labels"] == {"liver": 1, "spleen": 2}
    assert a["clip_model"] == "ViT-B-16" and a["tiny"] == "True"
    assert a != b
    # renaming a label (same ids) changes the prompts and so the adapter config
    renamed = _config(tmp_path, labels=json.dumps({"hepar": 1}))
    assert renamed.model.adapter_config()["class_prompts"] != a["class_prompts"]
    assert two.build_network().class_text.shape == (3, TINY_TEXT_WIDTH)


def test_masg_modules_conf(tmp_path):
    with pytest.raises(ValueError) as info:
        _config(tmp_path, masg_modules="hae,xyz")
    message = str(info.value)
    assert "--conf masg_modules 'hae,xyz'" in message and "'xyz' is not a valid value" in message

    config = _config(tmp_path, masg_modules="bfe")
    assert config.model.adapter_config()["masg_modules"] == ["bfe"]
    network = config.build_network()
    assert network.hae is None and network.dsf is None and network.bfe is not None
    assert "class_text" not in dict(network.named_buffers())
    assert config.text.encoder_loads == 0  # no text needed without DSF

    spaced = _config(tmp_path, masg_modules=" hae , dsf ")
    assert spaced.modules == ["hae", "dsf"]
    network = spaced.build_network()
    assert network.bfe is None and network.hae is not None and network.dsf is not None
