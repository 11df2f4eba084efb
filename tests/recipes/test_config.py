import pytest

from tckr.core.errors import ConfigError
from tckr.data.ingest import IngestConfig
from tckr.recipes.config import available_profiles, load_config, parse_config
from tckr.recipes.tckr.stages import STAGES

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps


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
    assert cfg.seed == 420  # the reference code's, as the root of every section's own
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


def _section_seeds(cfg) -> dict[str, int]:
    return {name: getattr(cfg, name).seed for name in type(cfg).model_fields if hasattr(getattr(cfg, name), "seed")}


@pytest.mark.parametrize("profile", ["demo", "demo-privimage", "paper-cifar10"])
def test_one_root_seed_gives_every_section_its_own(profile):
    """No two roles share a stream by accident; one --set reseeds the run; a seed set explicitly is kept; and
    the recipes that share an ingest (TCKR's and PrivImage's demos attack one population) derive the same one."""
    cfg = load_config(profile)
    seeds = _section_seeds(cfg)
    assert len(seeds) >= 7 and len(set(seeds.values())) == len(seeds)
    reseeded = _section_seeds(load_config(profile, ["seed=1"]))
    assert all(reseeded[name] != seed for name, seed in seeds.items())
    pinned = load_config(profile, ["seed=1", "attack.seed=7"])
    assert pinned.attack.seed == 7 and _section_seeds(pinned) == reseeded | {"attack": 7}
    assert _section_seeds(parse_config(cfg.model_dump_json())) == seeds  # a saved config keeps its seeds
    assert load_config("demo").ingest.seed == load_config("demo-privimage").ingest.seed


def test_json_round_trip_and_fingerprint():
    cfg = load_config("demo")
    again = parse_config(cfg.model_dump_json())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert load_config("demo", ["teacher.seed=1"]).fingerprint() != cfg.fingerprint()


PRIVIMAGE = (
    "recipe: privimage\ndataset: fashion-mnist\nimage_size: 16\ningest: {source: fashion-mnist}\n"
    "classifier: {model: tckr_cnn, epochs: 1}\n")


def test_one_configuration_for_either_recipe(tmp_path):
    """``recipe`` selects the model: the shared sections are the same, each recipe adds its own; experiments and
    registered models carry the recipe, so one recipe's model can never take the other's alias."""
    tckr_run = load_config("demo")
    (tmp_path / "private.yaml").write_text(PRIVIMAGE)
    privimage = load_config(str(tmp_path / "private.yaml"))
    assert (tckr_run.recipe, privimage.recipe) == ("tckr", "privimage")
    assert privimage.ingest == IngestConfig(source="fashion-mnist", seed=privimage.ingest.seed)
    assert not hasattr(privimage, "teacher")
    assert (tckr_run.experiment_name, privimage.experiment_name) == ("tckr-fashion-mnist", "privimage-fashion-mnist")
    assert privimage.registered_model_name("student") != tckr_run.registered_model_name("student")
    assert parse_config(privimage.model_dump_json()) == privimage
    (tmp_path / "mixed.yaml").write_text(PRIVIMAGE + "teacher: {model: tckr_cnn, epochs: 1}\n")
    with pytest.raises(ConfigError, match="teacher: unknown setting"):
        load_config(str(tmp_path / "mixed.yaml"))
    with pytest.raises(ConfigError, match="recipe: unknown recipe 'dp-gan' \\(choose one of tckr, privimage\\)"):
        load_config("demo", ["recipe=dp-gan"])


def test_kubernetes_stages_are_the_recipes_declared_ones():
    cfg = load_config("demo")
    assert list(cfg.kubernetes.stages) == STAGES.names()
    with pytest.raises(ConfigError, match="the tckr recipe's stages are start_run, finish_run, ingest"):
        load_config("demo", ["kubernetes.stages.dp_finetune.gpus=1"])


def test_errors_are_one_line_and_name_every_setting():
    with pytest.raises(ConfigError) as error:
        load_config("demo", ["teacher.epochs=0", "attack.shadows=3"])
    message = str(error.value)
    assert "\n" not in message and "teacher.epochs" in message and "shadows must be even" in message
