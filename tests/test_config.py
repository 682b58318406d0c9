import pytest

from vitadapt.config import ExperimentConfig, build_config, load_profile
from vitadapt.experiments.baselines import BaselineConfig
from vitadapt.experiments.data_backbones import DataBackboneConfig


def test_profile_yaml_then_params_take_precedence():
    cfg = build_config(BaselineConfig, "cpu", "01_baselines")
    assert cfg.dataset == "aid" and cfg.img_size == 112 and cfg.seeds == (0, 1, 2)
    assert cfg.out_dir == "outputs/cpu/01_baselines"
    cfg = build_config(BaselineConfig, "cpu", "01_baselines", img_size=56, seeds=[4], dataset=None)
    assert cfg.img_size == 56 and cfg.seeds == (4,) and cfg.dataset == "aid"


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu", "paper"])
def test_every_profile_builds_every_config(profile):
    for cls, nb in [(DataBackboneConfig, "00_data_and_backbones"), (BaselineConfig, "01_baselines")]:
        build_config(cls, profile, nb)


@pytest.mark.parametrize("params, match", [
    ({"dataset": "imagenet"}, r"dataset='imagenet' is not valid; valid values: aid, .*synthetic"),
    ({"weights": "dinov3"}, r"weights='dinov3' is neither .*valid sources: auto, .*dinov2_vits14_imgfocus"),
    ({"img_size": 4}, r"img_size=4 is out of range; valid: 8 <= img_size <= 1024"),
    ({"img_size": 3.5}, r"img_size=3.5 must be an integer"),
    ({"batch_size": 0}, r"batch_size=0 is out of range"),
    ({"feature": "gem"}, r"feature='gem' is not valid; valid values: 'cls', 'avg', 'cls\+avg'"),
    ({"precision": "fp8"}, r"precision='fp8' is not valid"),
    ({"seeds": []}, r"seeds=\(\) is empty"),
    ({"seeds": ["a"]}, r"every seed must be an integer"),
    ({"probe_Cs": [0.0]}, r"probe_Cs=\(0.0,\) is out of range"),
    ({"compare_random": "yes"}, r"compare_random='yes' must be True or False"),
    ({"learning_rate": 1e-3}, r"unknown parameter\(s\) \['learning_rate'\] for BaselineConfig; valid parameters: .*batch_size"),
])
def test_bad_values_fail_with_the_valid_ones_named(params, match):
    with pytest.raises(ValueError, match=match):
        build_config(BaselineConfig, "smoke", "01_baselines", **params)


def test_bad_profile_names_valid_profiles():
    with pytest.raises(ValueError, match="profile='tpu' is not valid; valid values: smoke, cpu, gpu, paper"):
        build_config(BaselineConfig, "tpu", "01_baselines")
    with pytest.raises(ValueError, match="profile='tpu'"):
        load_profile("tpu")


def test_show_list_is_validated():
    with pytest.raises(ValueError, match=r"unknown dataset\(s\) \['mnist'\]"):
        build_config(DataBackboneConfig, "smoke", "00_data_and_backbones", show=["aid", "mnist"])


def test_local_checkpoint_path_is_a_valid_weights_value(tmp_path):
    p = tmp_path / "w.pt"
    p.write_bytes(b"x")
    assert build_config(BaselineConfig, "smoke", weights=str(p)).weights == str(p)


def test_config_hash_tracks_values():
    a = build_config(ExperimentConfig, "smoke")
    b = build_config(ExperimentConfig, "smoke", img_size=48)
    assert a.hash() == build_config(ExperimentConfig, "smoke").hash() != b.hash()


def test_help_lists_every_field_with_text():
    text = BaselineConfig.help()
    assert "probe_Cs = (0.01, 0.1, 1.0, 10.0)  # Inverse regularisation" in text
    assert text.count("\n") + 1 == len(BaselineConfig.__dataclass_fields__)
