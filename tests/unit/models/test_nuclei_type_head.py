"""The type head fitted on unfolded features is the network's type head; user vocabularies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slidestream.errors import ConfigError, WeightsError
from slidestream.models.nuclei import NetworkConfig, NucleusModel, PostprocessConfig
from slidestream.models.nuclei._network import TYPE_NAMES, NucleusNet
from slidestream.models.nuclei._type_head import (
    TypeHeadConfig,
    TypeSamples,
    _match_points,
    _unfold_at,
    build_typed_network,
    fit_type_head,
    predict_sample_types,
)
from slidestream.overlays import nucleus_type_colors


def test_network_config_takes_a_user_vocabulary() -> None:
    assert NetworkConfig(n_types=4).type_names == TYPE_NAMES
    cfg = NetworkConfig(type_names=("Tumor", "Immune cells", "Stroma"))
    assert cfg.n_types == 3 and cfg.n_outputs == 6
    again = NetworkConfig.from_dict(cfg.to_dict())
    assert again == cfg
    # the shipped 4-type sidecars (no names) keep reading as TYPE_NAMES, and write no names
    assert "type_names" not in NetworkConfig(n_types=4).to_dict()
    with pytest.raises(ConfigError, match="distinct"):
        NetworkConfig(type_names=("a", "a"))
    with pytest.raises(ConfigError, match="n_types=2 but 3"):
        NetworkConfig(n_types=2, type_names=("a", "b", "c"))
    with pytest.raises(ConfigError, match="type_names of the channels"):
        NetworkConfig(n_types=3)


def _samples(rng: np.random.Generator, n: int, c: int = 16) -> tuple[TypeSamples, np.ndarray]:
    labels = rng.integers(0, 3, n)
    centres = rng.normal(0, 1, (3, c * 9))
    px = 8
    feats = centres[labels].repeat(px, axis=0) + rng.normal(0, 0.8, (n * px, c * 9))
    return (
        TypeSamples(
            features=feats.astype(np.float16),
            nucleus=np.arange(n).repeat(px),
            view=np.zeros(n * px, np.int8),
            labels=labels,
            groups=np.zeros(n, np.int64),
            matched=np.ones(n, bool),
        ),
        labels,
    )


def test_fitted_head_written_into_the_network_gives_the_same_probabilities() -> None:
    rng = np.random.default_rng(0)
    samples, labels = _samples(rng, 300)
    fit = fit_type_head(samples, 3, width=8, config=TypeHeadConfig(steps=150, batch_pixels=512))
    probs = predict_sample_types(fit, samples)
    assert (probs.argmax(1) == labels).mean() > 0.95  # separable classes are learnt
    base_cfg = NetworkConfig(features=(8, 8, 16, 16, 32, 16))
    base = NucleusNet(base_cfg).state_dict()
    net = build_typed_network(base, base_cfg, ("a", "b", "c"), fit)
    assert net.config.type_names == ("a", "b", "c")
    # the network's type head on decoder features == the MLP on their unfolded neighbourhoods
    feats = torch.randn(1, 16, 12, 14)
    with torch.no_grad():
        logits = net.unet.final_conv.types(feats)[0]
    rows, cols = np.array([0, 5, 11, 3]), np.array([0, 13, 7, 2])
    unf = _unfold_at(feats[0].numpy(), rows, cols)
    one = TypeSamples(
        features=unf.astype(np.float16),
        nucleus=np.arange(4),
        view=np.zeros(4, np.int8),
        labels=np.zeros(4, np.int64),
        groups=np.zeros(4, np.int64),
        matched=np.ones(4, bool),
    )
    expected = torch.softmax(logits[:, rows, cols].T, dim=1).numpy()
    np.testing.assert_allclose(predict_sample_types(fit, one), expected, atol=5e-3)
    # segmentation weights are the base model's
    own = net.state_dict()
    key = "unet.conv_0.conv_0.conv.weight"
    assert torch.equal(own[key], base[key])
    assert torch.equal(own["unet.final_conv.seg.weight"], base["unet.final_conv.weight"])


def test_class_weights_balance_rare_classes() -> None:
    rng = np.random.default_rng(1)
    samples, _ = _samples(rng, 400)
    rare = samples.subset((samples.labels != 2) | (np.arange(400) % 10 == 0))
    counts = np.bincount(rare.labels, minlength=3)
    for balance, expect_ratio in ((0.0, 1.0), (1.0, counts[0] / counts[2])):
        fit = fit_type_head(
            rare, 3, width=8, config=TypeHeadConfig(steps=2, batch_pixels=64, balance=balance)
        )
        w = fit.class_weights
        assert w[2] / w[0] == pytest.approx(expect_ratio, rel=1e-6)
        assert float((w * counts).sum()) == pytest.approx(rare.n_nuclei)


def test_points_match_one_instance_each() -> None:
    labels = np.zeros((40, 40), np.int32)
    labels[5:12, 5:12] = 1
    labels[20:30, 20:30] = 2
    # (8, 8) lies on instance 1; (9, 9) too, but instance 1 goes to the nearer point; (24.5,
    # 30.5) lies beside instance 2, 6 px below its centroid (24.5, 24.5); (38, 2) is far.
    pts = np.array([[8.0, 8.0], [9.0, 9.0], [24.5, 30.5], [38.0, 2.0]])
    assert _match_points(labels, pts, radius_px=6.0).tolist() == [1, 0, 2, 0]
    assert _match_points(labels, pts, radius_px=5.9).tolist() == [1, 0, 0, 0]


def test_type_colours_prefer_the_models_then_the_fixed_then_the_palette() -> None:
    colours = nucleus_type_colors(["inflammatory", "Tumor", "Necrosis"], {"Tumor": (9, 8, 7)})
    assert colours == {
        "Inflammatory": (40, 110, 255),
        "Tumor": (9, 8, 7),
        "Necrosis": (40, 170, 60),  # palette colour of position 2
    }


def test_a_model_folder_loads_by_its_path(tmp_path: Path) -> None:
    from slidestream.models.nuclei import load_nuclei_model
    from slidestream.models.nuclei._weights import save_weights

    cfg = NetworkConfig(features=(8, 8, 16, 16, 32, 16), type_names=("x", "y"))
    net = NucleusNet(cfg)
    folder = tmp_path / "m"
    with pytest.raises(WeightsError, match=r"expected one \.safetensors"):
        folder.mkdir()
        load_nuclei_model(folder)
    save_weights(
        net,
        folder / "w.safetensors",
        {
            "name": "my-model",
            "presets": {"default": {"mpp": 0.5, "postprocess": {}}},
            "default": "default",
            "type_colors": {"x": [1, 2, 3]},
        },
    )
    model = load_nuclei_model(folder)
    assert isinstance(model, NucleusModel)
    assert model.name == "my-model" and model.type_names == ("x", "y")
    assert model.type_colors == {"x": (1, 2, 3)}
    assert model.postprocess_config == PostprocessConfig()
