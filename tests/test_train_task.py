"""Job.train_task: one checkpoint fine-tuned on one task, evaluated on another of the same kind."""

import pytest

from eebench.runner import Job, check_supported, checkpoint_key, load_job_data
from eebench.suites import get_suite

from conftest import SHARED_DATA

DATA = str(SHARED_DATA / "generation")


def _job(task, train_task=None):
    return Job(method="calm", task=task, seed=0, backbone="tiny-llama", data_dir=DATA, train_limit=40, eval_limit=10,
               selection_examples=12, train_task=train_task)


def test_training_data_and_checkpoint_are_the_train_tasks_selection_and_dev_are_its_own():
    own, transferred = load_job_data(_job("alpaca")), load_job_data(_job("dolly", train_task="alpaca"))
    assert [e.example_id for e in transferred.train.examples] == [e.example_id for e in own.train.examples]
    assert all(e.example_id.startswith("dolly:") for e in transferred.dev.examples + transferred.selection.examples)
    assert not {e.example_id for e in transferred.dev.examples} & {e.example_id for e in transferred.selection.examples}
    signature = {"recipe": "x"}
    assert checkpoint_key(_job("dolly", "alpaca"), signature, transferred.carved) == checkpoint_key(
        _job("alpaca"), signature, own.carved)
    assert checkpoint_key(_job("dolly"), signature) != checkpoint_key(_job("alpaca"), signature)
    # absent from the job id when unset, so ids of jobs from before the setting hold
    assert "train_task" not in _job("alpaca").resolved() and _job("dolly", "alpaca").job_id != _job("dolly").job_id


def test_train_task_of_another_kind_is_rejected():
    with pytest.raises(ValueError, match="same kind"):
        check_supported(Job(method="pabee", task="sst2", seed=0, backbone="tiny-bert", train_task="stsb"))


def test_suite_shares_one_training_task_and_per_task_configs():
    jobs = get_suite("generation-smollm2").jobs()
    assert {j.trained_on for j in jobs} == {"alpaca"} and not any(j.train_task for j in jobs if j.task == "alpaca")
    assert [j.method_config["thresholds"] for j in jobs if j.task == "cnndm"] == [(0.8, 0.6)]
