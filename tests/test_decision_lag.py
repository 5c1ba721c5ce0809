"""Deciding one layer late (`MultiExitModel.decision_lag` = 1, `--exit-decision late`): the same answers as
deciding at once, one more layer executed and charged for every early exit, and replay agreeing with the online
path. The CUDA-side gain (no per-layer host sync) needs a GPU; the logic is the same on the CPU."""

from __future__ import annotations

import pytest
import torch
from test_exits import FixedExits, _model, _right_padded_batch

from eebench.methods.deebert import entropy_rule
from eebench.methods.exits import set_decision_lag
from eebench.runner import EvalConfig, Job, validate_jobs


def _count_rows_per_layer(model, monkeypatch) -> list[int]:
    """Spy on the backbone: how many example rows each layer call ran (what layers were really executed)."""
    rows: list[int] = []
    real_layer = model.backbone.layer
    monkeypatch.setattr(model.backbone, "layer", lambda i, h, b: (rows.append(h.shape[0]), real_layer(i, h, b))[1])
    return rows


@pytest.mark.parametrize("reads_logits", [True, False])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_late_decisions_answer_the_same_and_charge_the_extra_layer(pooling, reads_logits, monkeypatch):
    model = _model(pooling)
    layers = model.num_layers
    targets = [1, 2, layers - 1, layers, 1, 2]
    batch = _right_padded_batch([9, 4, 6, 7, 3, 9], model.backbone.model.config.vocab_size)
    with torch.inference_mode():
        now = model.early_exit(batch, FixedExits(targets, reads_logits))
        assert set_decision_lag(model, 1) == 1
        rows = _count_rows_per_layer(model, monkeypatch)
        late = model.early_exit(batch, FixedExits(targets, reads_logits))
    assert now.exit_layer.tolist() == targets
    assert late.exit_layer.tolist() == [min(target + 1, layers) for target in targets]
    torch.testing.assert_close(late.logits, now.logits, rtol=1e-5, atol=1e-6)  # head i answers, as before
    torch.testing.assert_close(late.head_macs, now.head_macs)  # head i+1 is never evaluated for a leaver
    assert sum(rows) == int(late.exit_layer.sum())  # exit_layer counts exactly the layers that ran


def test_everyone_leaving_at_layer_one_runs_two_layers(monkeypatch):
    model = _model("cls")
    batch = _right_padded_batch([5, 5], model.backbone.model.config.vocab_size)
    set_decision_lag(model, 1)
    rows = _count_rows_per_layer(model, monkeypatch)
    with torch.inference_mode():
        late = model.early_exit(batch, FixedExits([1, 1]))
    assert rows == [2, 2]
    assert late.exit_layer.tolist() == [2, 2]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_replay_follows_the_late_mode(batch_size):
    """Quality is replayed from a trace; with the lag it must report what the online late path runs (the runner
    charges FLOPs and saved layers from the replay)."""
    model = _model("mean")
    batch = _right_padded_batch([7, 5, 9, 4][:batch_size], model.backbone.model.config.vocab_size)
    with torch.inference_mode():
        for head in model.heads:  # sharp heads so that the entropy rule exits at different layers
            head.classifier.weight.mul_(400)
        trace = model.trace(batch)
        rule = entropy_rule(0.6)
        now = model.replay(trace, rule)
        assert len(set(now.exit_layer.tolist())) == batch_size - 1 or batch_size == 1  # exits at 3 layers of 4
        set_decision_lag(model, 1)
        online, replayed = model.early_exit(batch, rule), model.replay(trace, rule)
    assert online.exit_layer.tolist() == replayed.exit_layer.tolist()
    assert replayed.exit_layer.tolist() == [min(layer + 1, model.num_layers) for layer in now.exit_layer.tolist()]
    torch.testing.assert_close(online.logits, replayed.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(online.head_macs, replayed.head_macs)


def test_set_decision_lag_reports_models_without_layerwise_exits():
    assert set_decision_lag(torch.nn.Linear(2, 2), 1) == 0
    with pytest.raises(ValueError, match="must be 0"):
        set_decision_lag(_model("cls"), 2)


def test_late_decision_is_refused_for_token_wise_methods_before_any_job(tmp_path):
    job = Job(method="hashee", task="sst2", seed=0, backbone="tiny-bert", eval=EvalConfig(exit_decision="late"))
    with pytest.raises(ValueError, match="layer-wise methods.*drop --exit-decision late"):
        validate_jobs([job])


def test_the_default_mode_keeps_job_ids():
    """'now' is what every stored job ran: it must not enter the job's identity (stored results stay found)."""
    default = Job(method="pabee", task="sst2", seed=0, backbone="tiny-bert")
    assert "exit_decision" not in default.resolved()["eval"]
    late = Job(method="pabee", task="sst2", seed=0, backbone="tiny-bert", eval=EvalConfig(exit_decision="late"))
    assert late.job_id != default.job_id
