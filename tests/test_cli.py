"""The command line: bad input gets a clear error (exit 2) that names the problem and the fix, and never
corrupts stored results; a good run writes records, a leaderboard and figures."""

from __future__ import annotations

import pytest
import torch

from eebench.cli import _split_list, main
from eebench.methods import registry
from eebench.methods.pabee import PABEE
from eebench.training import NonFiniteLossError

from conftest import GLUE

TINY = ["--backbone", "tiny-bert", "--train-limit", "32", "--eval-limit", "12", "--epochs", "1",
        "--timing-examples", "4", "--timing-min-seconds", "0", "--quiet"]


class NanLoss(PABEE):
    """PABEE whose loss diverges (to test the NaN guard)."""

    name = "nanloss"

    def fit(self, trainer):
        trainer.train(self.model.parameters(), lambda batch: torch.tensor(float("nan"), requires_grad=True), stage="x")


def test_list_options_accept_commas_and_spaces():
    assert _split_list(["a,b", "c"]) == ["a", "b", "c"]
    assert _split_list(["a", "b"]) == ["a", "b"]
    assert _split_list(None) is None


@pytest.mark.parametrize("args, expected", [
    (["run", "--methods", "pabe"], "Did you mean 'pabee'"),
    (["run", "--tasks", "sst3"], "did you mean 'sst2'"),
    (["run", "--suite", "quik"], "Did you mean 'quick'"),
    (["run", "--device", "cuda:3"], "use --device cpu"),
    (["run", "--timing-min-seconds", "-1"], "use 0 to time exactly the suite's repeats"),
    (["leaderboard", "--results", "/nonexistent/dir"], "eebench run --out"),
])
def test_bad_arguments_fail_with_a_named_fix(capsys, args, expected):
    assert main(args) == 2
    assert expected in capsys.readouterr().err


def test_typed_flags_fail_in_argparse_before_torch_is_imported():
    import subprocess
    import sys

    probe = ("import sys\nfrom eebench.cli import main\ntry:\n    main(['run', '--seeds', '0,zero'])\n"
             "except SystemExit as exit:\n    print(exit.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"]
    assert "seeds are integers (e.g. --seeds 0 1 2 or 0,1,2), got '0,zero'" in done.stderr


def test_seeds_take_commas_and_spaces():
    from eebench.cli import _parser

    assert _parser().parse_args(["run", "--seeds", "0,1", "2"]).seeds == [[0, 1], [2]]


def test_run_help_names_every_suite_method_and_task_and_the_default_seeds(capsys):
    from eebench.methods import method_names
    from eebench.suites import SUITES
    from eebench.tasks import task_names

    with pytest.raises(SystemExit) as exit:
        main(["run", "--help"])
    assert exit.value.code == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in [*SUITES, *method_names(), *task_names("all")])
    assert f"seeds {', '.join(map(str, SUITES['quick'].seeds))}" in shown and "--allow-mixed-commits" in shown
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(command in top for command in ("run", "leaderboard", "points", "training", "plot", "glossary"))


def test_method_summaries_are_whole_paragraphs():
    from eebench.methods.registry import docstring_summary, list_methods

    assert docstring_summary("A summary wrapped\n    over two lines.\n\n    Details.") == "A summary wrapped over two lines."
    assert all(info.summary and "\n" not in info.summary for info in list_methods())


def test_missing_train_split_is_named(capsys, tmp_path):
    code = main(["run", "--tasks", "qnli", "--methods", "pabee", "--data-dir", str(GLUE), "--out", str(tmp_path), *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "qnli" in err and "train" in err


def test_malformed_data_file_names_file_and_line(capsys, tmp_path):
    folder = tmp_path / "data" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\tpositive\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    code = main(["run", "--tasks", "sst2", "--methods", "pabee", "--data-dir", str(tmp_path / "data"),
                 "--out", str(tmp_path / "out"), *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.tsv" in err and ":3" in err


def test_bad_data_of_a_later_job_fails_before_the_first_job_and_leaves_the_store_alone(capsys, tmp_path):
    """Every job's input is checked before any runs; a store holding merged lines is not rewritten by a failed run."""
    data = tmp_path / "data"
    for task, dev in (("SST-2", "sentence\tlabel\nfine\t1\n"), ("RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\n")):
        (data / task).mkdir(parents=True)
        (data / task / "train.tsv").write_text((GLUE / task / "train.tsv").read_text().splitlines()[0] + "\n" +
                                               "\n".join((GLUE / task / "train.tsv").read_text().splitlines()[1:40]) + "\n")
        (data / task / "dev.tsv").write_text(dev)
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    (out / "records.jsonl").write_text('{"job_id": "from-another-machine", "metric": 0.5}\n')
    code = main(["run", "--tasks", "sst2,rte", "--methods", "pabee", "--data-dir", str(data), "--out", str(out),
                 "--cache-dir", str(cache), "--selection-examples", "8", *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "RTE/dev.tsv:2" in err and "expected 4 tab-separated columns" in err
    assert "before running any job; nothing was stored" in err and "pabee / rte" in err
    assert [p.name for p in out.iterdir()] == ["records.jsonl"]  # no jobs/, examples/: the store was never opened
    assert (out / "records.jsonl").read_text() == '{"job_id": "from-another-machine", "metric": 0.5}\n'
    assert not cache.exists()  # and nothing was trained


def test_nan_loss_stops_the_job_and_stores_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.BUILTIN_METHODS, "nanloss", "test_cli:NanLoss")
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = main(["run", "--methods", "nanloss", "--out", str(out), "--cache-dir", str(cache), *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err and "lower the learning rate" in err
    assert (out / "records.jsonl").read_text() == ""
    assert not list(cache.rglob("*.pt"))
    with pytest.raises(NonFiniteLossError):
        monkeypatch.setenv("EEBENCH_DEBUG", "1")
        main(["run", "--methods", "nanloss", "--out", str(out), "--cache-dir", str(cache), *TINY])


def test_run_leaderboard_plot_end_to_end(capsys, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["run", "--out", str(out), "--cache-dir", str(cache), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "2 job(s) run" in printed and "| graded | " in printed  # the summary table
    assert f"written: {out / 'leaderboard.md'}" in printed and (out / "leaderboard.md").exists()
    assert main(["leaderboard", "--results", str(out)]) == 0
    assert (out / "leaderboard.md").read_text().count("| graded |") == 2
    assert main(["leaderboard", "--results", str(out), "--speedup", "wallclock_speedup", "--batch-size", "32"]) == 0
    assert "batch size 32" in (out / "leaderboard_wallclock_speedup_bs32.md").read_text()
    before = (out / "leaderboard.md").read_text()
    assert main(["leaderboard", "--results", str(out), "--by-config"]) == 0  # one setting per method: same rows
    assert (out / "leaderboard_by_config.md").read_text() == before and (out / "leaderboard.md").read_text() == before
    assert main(["points", "--results", str(out)]) == 0
    points = (out / "points.md").read_text()
    assert "wall-clock bs=1" in points and "wall-clock bs=32" in points and "patience=1" in points
    assert "realization bs=1" in points
    assert points.rstrip().endswith("(2 jobs).") and "Measured at commit " in points  # one commit measured it
    assert "Measured at commit " in (out / "leaderboard.md").read_text()
    assert main(["points", "--results", str(out), "--ci"]) == 0
    assert "95% CI" in (out / "points.md").read_text()
    assert main(["difficulty", "--results", str(out)]) == 0
    assert "exit@3" in capsys.readouterr().out
    assert main(["plot", "--results", str(out)]) == 0
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"graded_saved_layer_speedup.png", "graded_saved_layer_speedup.pdf",
            "graded_wallclock_speedup_bs1.png", "graded_flops_speedup.png"} <= figures


def test_methods_and_tasks_listings(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "deebert" in listing and "built-in" in listing and "entropy_threshold" in listing
    assert main(["tasks"]) == 0
    assert "stackoverflow" in capsys.readouterr().out
    assert main(["glossary"]) == 0
    assert "saved_layer_speedup" in capsys.readouterr().out


def test_quiet_silences_transformers_bars_including_the_gguf_converter():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from eebench.cli import _library_bars

    original = gguf_utils.tqdm
    with _library_bars(shown=False):
        assert not hf_logging.is_progress_bar_enabled()
        assert gguf_utils.tqdm(range(3)).disable  # the converter's bar, as the converter builds it
    assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()
    with _library_bars(shown=True):
        assert gguf_utils.tqdm is original
