import pytest

from tckr.core.errors import ConfigError
from tckr.recipes.config import available_profiles, load_config, parse_config


def test_profiles_resolve_and_validate():
    assert {"smoke", "demo", "paper-cifar10"} <= set(available_profiles())
    for name in available_profiles():
        cfg = load_config(name)
        assert cfg.profile == name


def test_smoke_extends_demo():
    demo, smoke = load_config("demo"), load_config("smoke")
    assert smoke.image_size == demo.image_size
    assert smoke.teacher.model == demo.teacher.model
    assert smoke.teacher.epochs == 1
    assert smoke.ingest.train_limit is not None


def test_paper_profile_holds_reference_recipe():
    cfg = load_config("paper-cifar10")
    teacher = cfg.teacher
    assert cfg.ingest.name == "uoft-cs/cifar10" and cfg.ingest.source == "hub"
    assert cfg.image_size == 224
    assert teacher.model.startswith("mobilenetv3") and teacher.pretrained
    assert (teacher.lr, teacher.weight_decay, teacher.batch_size) == (1e-3, 5e-5, 96)
    assert teacher.label_smoothing == 0.1 and teacher.mixup_alpha > 0
    assert teacher.augmix and teacher.hflip and teacher.crop_padding == 22 and teacher.amp
    assert teacher.seed == 420
    assert cfg.runtime.device == "cuda"


def test_overrides_are_typed():
    cfg = load_config("demo", ["teacher.epochs=3", "teacher.lr=0.01", "teacher.augmix=true",
                               "ingest.class_name_fixes={cra: crab}", "tracking.experiment=mine"])
    assert cfg.teacher.epochs == 3 and isinstance(cfg.teacher.epochs, int)
    assert cfg.teacher.lr == 0.01 and cfg.teacher.augmix is True
    assert cfg.ingest.class_name_fixes == {"cra": "crab"}
    assert cfg.experiment_name == "mine"


def test_default_experiment_is_per_dataset():
    assert load_config("demo").experiment_name == "tckr-fashion-mnist"


@pytest.mark.parametrize(("override", "message"), [
    ("teacher.epochs=0", "teacher.epochs: Input should be greater than 0"),
    ("teacher.epohcs=3", "teacher.epohcs: unknown setting"),
    ("runtime.device=tpu", "runtime.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("ingest.holdout_fraction=0.7", "leaves less than 5% of the train split"),
    ("ingest.test_split=null", "test_fraction must be > 0"),
])
def test_invalid_values_name_the_setting(override, message):
    with pytest.raises(ConfigError, match="invalid profile 'demo'") as error:
        load_config("demo", [override])
    assert message in str(error.value)


def test_bad_override_syntax_and_unknown_profile(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config("demo", ["teacher.epochs"])
    with pytest.raises(ConfigError, match="'teacher' is a value, not a section"):
        load_config("demo", ["teacher=1", "teacher.epochs=2"])
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*demo"):
        load_config("nope")
    with pytest.raises(ConfigError, match="profile file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_profile_file_with_extends_and_loop(tmp_path):
    child = tmp_path / "mine.yaml"
    child.write_text("extends: smoke\nteacher:\n  epochs: 2\n")
    cfg = load_config(str(child))
    assert cfg.profile == "mine" and cfg.teacher.epochs == 2 and cfg.ingest.train_limit == 1200
    looped = tmp_path / "loop.yaml"
    looped.write_text(f"extends: {looped}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(looped))


def test_json_round_trip_and_fingerprint():
    cfg = load_config("demo")
    again = parse_config(cfg.model_dump_json())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert load_config("demo", ["teacher.seed=1"]).fingerprint() != cfg.fingerprint()
