"""Settings from outside (pipeline.core.settings) and what a valid config is (pipeline.config): the tables agree with the
code that uses them, every preset is valid, and every way a value can be wrong is named."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from pipeline.core import settings
from pipeline.config import LIMITS, PRESETS, RunConfig, check_config, from_dict, preset, to_dict
from pipeline.core.errors import ConfigError


def test_the_choices_declared_beside_the_fields_are_the_ones_implemented():
    from pipeline.training.optim import build_dense_optimizer
    from pipeline.inference.vote import SELECTORS

    hints = settings.field_hints(RunConfig)
    predict_hints = settings.field_hints(type(RunConfig().predict))
    assert set(settings.choices(predict_hints["selector"])) == set(SELECTORS)
    import torch

    named = [("blocks.0.weight", torch.nn.Parameter(torch.zeros(2, 2))), ("bias", torch.nn.Parameter(torch.zeros(2)))]
    for name in settings.choices(hints["optimizer"]):
        if name == "muon" and not hasattr(torch.optim, "Muon"):
            continue  # torch < 2.9: a clear error instead (tests/test_optim.py)
        build_dense_optimizer(named, name)


def test_every_numeric_setting_has_bounds():
    """A numeric setting added without bounds would fail deep inside a stage on a bad value: declare it in LIMITS."""
    numeric = {k for k, v in settings.flatten(RunConfig()).items() if isinstance(v, (int, float))
               and not isinstance(v, bool)}
    assert numeric - set(LIMITS) == set(), "add these settings to pipeline.config.LIMITS"
    assert set(LIMITS) - numeric == set(), "LIMITS names settings that do not exist"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_valid_and_survives_its_json_form(name: str):
    cfg = preset(name)
    check_config(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("value, hint, problem", [
    (True, int, "an integer"), (1.5, int, "an integer"), ("8", int, "an integer"), (2**40, int, "out of range"),
    (math.nan, float, "finite"), (math.inf, float, "finite"), ("1", float, "a finite number"),
    (1, bool, "true or false"), (["vote"], typing.Literal["vote", "max_q"], "one of vote, max_q"),
    ("best", typing.Literal["vote", "max_q"], "got 'best'"), (3, str, "text"),
])
def test_a_wrong_value_is_named(value, hint, problem):
    assert problem in settings.value_problem(value, hint)


@pytest.mark.parametrize("value, hint", [(3, int), (3, float), (0.5, float), (False, bool), ("", str),
                                         ("vote", typing.Literal["vote"])])
def test_a_right_value_passes(value, hint):
    assert settings.value_problem(value, hint) is None


@pytest.mark.parametrize("item, message", [
    ("data.num_aug=1e5", None), ("lr=2e-4", None), ("ema=off", None),
    ("data.num_aug=1e400", "expected an integer"), ("lr=nan", "finite"), ("lr=inf", "finite"),
    ("data=x", "is a section"), ("nodata.x=1", "no section"), ("data.nope=1", "unknown setting"),
    ("predict.selector=best", "one of vote"), ("lr", "key=value"),
])
def test_command_line_settings(item: str, message: str | None):
    cfg = preset("demo")
    if message is None:
        settings.apply_settings(cfg, [item])
        return
    with pytest.raises(ConfigError, match=message):
        settings.apply_settings(cfg, [item])


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["predict"].update(batch_size="8"), "predict.batch_size: expected an integer, got '8'"),
    (lambda d: d.update(model=3), "setting 'model' should be a JSON object"),
    (lambda d: d["data"].update(extra=1), "unknown setting 'data.extra'"),
])
def test_a_saved_config_is_read_the_same_way(edit, message: str):
    d = to_dict(preset("demo"))
    edit(d)
    with pytest.raises(ConfigError, match=message):
        from_dict(d, where="config.json")


def test_relations_between_settings():
    cfg = preset("demo")
    check_config(cfg, world=4)  # 64 rows over 4 processes
    with pytest.raises(ConfigError, match="does not divide into 3 process"):
        check_config(cfg, world=3)
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=30, num_heads=2))
    with pytest.raises(ConfigError, match="even width per head"):
        check_config(bad)
