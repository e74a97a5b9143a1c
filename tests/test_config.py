"""SoteriaConfig: validation, derived views, JSON round trip, and what save_pretrained writes."""

import json
import math
from pathlib import Path

import pytest

from soteria.steer.config import SoteriaConfig
from soteria.version import __version__


def _cfg(**kw):
    base = dict(
        languages=["en", "fr"],
        heads={"en": [(0, 1), (1, 2)], "fr": [[1, 2], (0, 3)]},
        scale={"en": 0.5, "fr": 2.0},
        harm_source="checkpoint:org/harmful",
        harm_kind="harmful",
        method="atp",
        top_k=2,
        model_type="llama",
    )
    base.update(kw)
    return SoteriaConfig(**base)


def test_round_trip_and_sorted_json():
    cfg = _cfg()
    assert cfg.soteria_version == __version__
    assert cfg.heads["fr"] == [(1, 2), (0, 3)]  # lists normalised to tuples
    d = cfg.to_dict()
    assert list(d) == sorted(d)
    assert d["heads"] == {"en": [[0, 1], [1, 2]], "fr": [[1, 2], [0, 3]]}
    text = cfg.to_json()
    assert json.loads(text) == d
    assert text == json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False)
    back = SoteriaConfig.from_json(text)
    assert back == cfg
    assert SoteriaConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_every_field_has_help():
    from dataclasses import fields

    for f in fields(SoteriaConfig):
        assert f.metadata.get("help"), f.name


def test_head_scales_take_the_largest_and_union_is_sorted():
    cfg = _cfg()
    assert cfg.head_union == [(0, 1), (0, 3), (1, 2)]
    assert cfg.head_scales() == {(0, 1): 0.5, (0, 3): 2.0, (1, 2): 2.0}
    assert cfg.scale_of("en") == 0.5
    one = _cfg(scale=0.25)
    assert set(one.head_scales().values()) == {0.25}
    with pytest.raises(ValueError, match="not one of the steered languages"):
        cfg.scale_of("de")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(languages=[]), "non-empty list"),
        (dict(languages=["en", "en"], heads={"en": [(0, 0)]}), "repeat"),
        (dict(heads={"en": [(0, 1)]}), r"missing \['fr'\]"),
        (dict(heads={"en": [(0, 1)], "fr": [(0, 1)], "de": [(0, 1)]}), r"unexpected \['de'\]"),
        (dict(heads={"en": [(0, -1)], "fr": [(0, 1)]}), "pairs of ints >= 0"),
        (dict(heads={"en": [(0, 1.0)], "fr": [(0, 1)]}), "pairs of ints"),
        (dict(heads={"en": [(True, 1)], "fr": [(0, 1)]}), "pairs of ints"),
        (dict(heads={"en": [], "fr": [(0, 1)]}), "empty"),
        (dict(scale=math.nan), "finite"),
        (dict(scale=math.inf), "finite"),
        (dict(scale="1.0"), "finite float"),
        (dict(scale={"en": 1.0}), r"missing \['fr'\]"),
        (dict(scale={"en": 1.0, "fr": math.inf}), r"scale\['fr'\]"),
        (dict(method="magic"), "method must be one of"),
        (dict(harm_kind="other"), "harm_kind"),
        (dict(top_k=0), "top_k"),
        (dict(scale=-0.5), "negative scale adds the harm direction"),
        (dict(scale={"en": 1.0, "fr": -1.0}), r"scale\['fr'\] is -1.0"),
        (dict(languages=["EN", "fr"]), "EN"),
        (dict(relative_scale=0.0), "relative_scale must be a positive"),
        (dict(find_options={"tasks": object()}), "find_options must hold JSON values"),
        (dict(harm_options=[1]), "harm_options must be a dict"),
        (dict(method="explicit", heads=None), "needs heads"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_single_language_string_and_unknown_keys_warn():
    cfg = SoteriaConfig(languages="de", heads={"de": [(0, 0)]})
    assert cfg.languages == ["de"] and cfg.method is None and cfg.scale == "auto" and not cfg.is_resolved
    d = cfg.to_dict()
    d["from_the_future"] = 1
    with pytest.warns(UserWarning, match="from_the_future"):
        assert SoteriaConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="needs a dict"):
        SoteriaConfig.from_dict([1])


def test_saved_in_config_json(tmp_path):
    """What SoteriaPatcher stores in model.config survives save_pretrained / from_pretrained."""
    from transformers import AutoConfig

    from soteria.models.tiny import tiny_config

    config = tiny_config("llama")
    cfg = _cfg()
    config.soteria = cfg.to_dict()
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["soteria"] == cfg.to_dict()
    again = AutoConfig.from_pretrained(tmp_path)
    assert SoteriaConfig.from_dict(again.soteria) == cfg


def test_a_request_names_what_to_find():
    req = SoteriaConfig(["es", "fr"], harm_source="org/harmful", top_k=48, find_options={"n_shots": 5})
    assert req.heads is None and req.scale == "auto" and not req.is_resolved
    with pytest.raises(ValueError, match="needs a resolved config"):
        _ = req.head_union
    assert SoteriaConfig.from_json(req.to_json()) == req
    with_path = SoteriaConfig(["es"], find_options={"tasks": {"mine": Path("/data/mine.jsonl")}})
    assert with_path.to_dict()["find_options"] == {"tasks": {"mine": "/data/mine.jsonl"}}  # JSON for config.json
    one_list = SoteriaConfig(["es", "fr"], heads=[(0, 1), (0, 1), (1, 0)], scale=0.5)
    assert one_list.heads == {"es": [(0, 1), (1, 0)], "fr": [(0, 1), (1, 0)]}  # repeats dropped
    assert one_list.is_resolved is False  # method still unknown: apply records it
