"""Registry: built-ins, entry-point plugins (installed by the test), and the errors users see."""

from __future__ import annotations

import pytest

from eebench.methods import (
    DuplicateMethodError,
    ProtocolError,
    UnknownMethodError,
    build_method,
    get_method_class,
    list_methods,
    method_names,
)

from conftest import install_plugin

PLUGIN_CODE = '''
import torch
from eebench.methods.exits import ExitHead, MultiExitModel


class FirstLayer:
    """Always exit after layer 1 (a throwaway plugin for the tests)."""

    name = "{name}"
    granularity = "layer"
    task_kinds = frozenset({{"classification"}})
    knob_names = ("depth",)

    def attach(self, backbone, task):
        heads = [ExitHead(backbone.pooler, backbone.hidden_size, task.num_labels, 0.0, 0.02)
                 for _ in range(backbone.num_layers)]
        self.model = MultiExitModel(backbone, heads)
        return self.model

    def fit(self, trainer):
        pass

    def knobs(self, task, num_layers):
        return [{{"depth": num_layers}}, {{"depth": 1}}]

    def predict(self, batch, knob):
        return self.model.full(batch)

    def training_signature(self):
        return {{"recipe": "none"}}


class Broken:
    name = "{name}"
    granularity = "layer"
    def attach(self, backbone, task):
        pass
'''


def install(tmp_path, monkeypatch, dist: str, entries: dict[str, str], name: str = "firstlayer") -> None:
    install_plugin(tmp_path, monkeypatch, dist, f"{dist}_pkg", PLUGIN_CODE.format(name=name), entries)


def test_builtins_are_registered():
    assert {"deebert", "pabee"} <= set(method_names())
    info = {m.name: m for m in list_methods()}
    assert info["pabee"].origin == "built-in"
    assert info["pabee"].granularity == "layer"
    assert info["pabee"].knob_names == ("patience",)
    assert set(info["pabee"].task_kinds) == {"classification", "regression"}
    assert info["deebert"].task_kinds == ("classification",)


def test_unknown_method_lists_known_and_suggests():
    with pytest.raises(UnknownMethodError) as error:
        get_method_class("pabe")
    message = str(error.value)
    assert "unknown method 'pabe'" in message and "deebert" in message and "Did you mean 'pabee'" in message


def test_entry_point_plugin_is_discovered_and_runs(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "eebench_test_plugin", {"firstlayer": "FirstLayer"})
    assert "firstlayer" in method_names()
    info = {m.name: m for m in list_methods()}["firstlayer"]
    assert info.origin == "eebench_test_plugin"
    assert info.summary.startswith("Always exit after layer 1")
    method = build_method("firstlayer")
    assert type(method).__module__ == "eebench_test_plugin_pkg"


def test_plugin_that_breaks_the_protocol_names_what_is_missing(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "eebench_broken_plugin", {"broken": "Broken"}, name="broken")
    with pytest.raises(ProtocolError) as error:
        get_method_class("broken")
    message = str(error.value)
    for missing in ("task_kinds", "knob_names", "'fit'", "'knobs'", "'predict'", "'training_signature'"):
        assert missing in message
    assert "eebench_broken_plugin" in message
    assert "'attach' must take 2 argument" not in message  # attach has the right arity


def test_name_collision_with_a_builtin_is_an_error(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "eebench_clash_plugin", {"pabee": "FirstLayer"}, name="pabee")
    with pytest.raises(DuplicateMethodError) as error:
        method_names()
    assert "pabee" in str(error.value) and "eebench_clash_plugin" in str(error.value)


def test_entry_point_name_must_match_class_name(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "eebench_misnamed_plugin", {"other": "FirstLayer"}, name="firstlayer")
    with pytest.raises(ProtocolError, match="make the entry-point name"):
        get_method_class("other")


def test_entry_point_that_cannot_be_imported(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "eebench_typo_plugin", {"typo": "NoSuchClass"}, name="typo")
    with pytest.raises(ProtocolError, match="cannot be imported"):
        get_method_class("typo")
