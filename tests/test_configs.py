"""Every option of every config group composes; typos and wrong types are refused at compose time."""
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from ablate.config import compose, project_root
from ablate.validate import ConfigError, plan

CONF = project_root() / "conf"
GROUPS = ["attention", "pos", "mlp", "norm", "model", "data", "backend", "train", "tracking"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_names_its_component(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg[group].name == option


def test_every_option_is_a_registered_component():
    from ablate.data import CORPORA
    from ablate.kernels import BACKENDS
    from ablate.models import ATTENTIONS, MLPS, NORMS, POSITIONS

    registries = {"attention": ATTENTIONS, "pos": POSITIONS, "mlp": MLPS, "norm": NORMS, "data": CORPORA}
    for group, registry in registries.items():
        files = {p.stem for p in (CONF / group).glob("*.yaml")}
        assert files == set(registry.names()), group
    backends = {p.stem for p in (CONF / "backend").glob("*.yaml")}
    assert backends == set(BACKENDS.names()) | {"auto"}


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (project_root() / "experiments").glob("*.yaml")))
def test_named_experiments_compose_with_their_sweep(experiment):
    cfg = compose([f"+experiment={experiment}"], return_hydra_config=True)
    assert cfg.tracking.experiment == experiment.removesuffix("_gpu")  # a GPU-sized variant logs beside its CPU one
    assert cfg.hydra.sweeper.params


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (project_root() / "experiments").glob("*_gpu.yaml")))
def test_a_gpu_sized_experiment_asks_for_the_gpu_and_is_refused_without_one(experiment):
    """A GPU-sized sweep on a machine without a GPU would train on the CPU for hours: it is refused at once."""
    cfg = compose([f"+experiment={experiment}"])
    assert cfg.device == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda but no CUDA GPU is visible"):
            plan(cfg)


def test_typo_key_is_refused_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["model.n_layres=3"])
    assert "n_layres" in str(err.value.__cause__ or err.value)


def test_wrong_type_is_refused_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["train.steps=many"])
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError)
    assert "steps" in str(cause)


@pytest.mark.parametrize("override", ["attention=linear", "model=gpt5"])
def test_unknown_option_is_refused(override):
    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    assert override.split("=")[1] in str(err.value) and override.split("=")[0] in str(err.value)


def test_default_config_points_at_project_outputs():
    cfg = compose()
    assert Path(cfg.paths.output_dir) == Path(cfg.paths.root_dir) / "outputs"
    assert isinstance(cfg.seed, int)
    with pytest.raises(ConfigAttributeError):
        cfg.model.not_a_key = 1


@pytest.mark.parametrize("arch", sorted(p.stem for p in (CONF / "arch").glob("*.yaml")))
def test_an_arch_selects_each_of_its_components(arch):
    from omegaconf import OmegaConf

    wanted = {key.removeprefix("override /"): option
              for entry in OmegaConf.load(CONF / "arch" / f"{arch}.yaml").defaults for key, option in entry.items()}
    cfg = compose([f"+arch={arch}"])
    assert len(wanted) == 4 and {group: cfg[group].name for group in wanted} == wanted
