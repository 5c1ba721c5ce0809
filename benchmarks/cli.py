"""`eebench` command line: run suites of early-exit jobs, then read their stored results (leaderboard, points, compare,
training, difficulty, hardness, plot, figures, report), evaluate a decoder method through lm-eval (lm-eval), or list what exists (methods, tasks, suites, glossary)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from eebench.executors.arguments import add_executor_arguments, executor_from_arguments

DEFAULT_SUITE = "quick"


def _split_list(values: Sequence[str] | None) -> list[str] | None:
    """Accept both `--methods a,b` and `--methods a b` (and mixtures)."""
    if values is None:
        return None
    return [item for value in values for item in value.replace(",", " ").split()]


def _seed_values(text: str) -> list[int]:
    """`--seeds 0,1 2`: each argument is one or more comma-separated integers (checked by argparse, so a typo
    fails at once, before torch is imported)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are integers (e.g. --seeds 0 1 2 or 0,1,2), got '{text}'") from None


class _RunHelp(argparse.Action):
    """`eebench run --help` lists the suites, methods and tasks by name. They are read only when help is asked
    for, since the registries import torch (seconds) and every other use of the parser should stay fast."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from eebench.methods import method_names
        from eebench.suites import SUITES
        from eebench.tasks import task_names

        default = SUITES[DEFAULT_SUITE]
        parser.epilog = (f"suites: {', '.join(SUITES)}\nmethods: {', '.join(method_names())}\n"
                         f"tasks: {', '.join(task_names('all'))}\ndefault suite '{DEFAULT_SUITE}': methods "
                         f"{', '.join(default.methods)}; tasks {', '.join(default.tasks)}; seeds "
                         f"{', '.join(map(str, default.seeds))}; backbone {default.backbone}. Each suite's own "
                         f"settings: `eebench suites`.")
        parser.print_help()
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eebench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="fine-tune and evaluate a suite of jobs; results go to --out", add_help=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("-h", "--help", action=_RunHelp, help="show this help (with every suite, method and task name)")
    run.add_argument("--suite", default=DEFAULT_SUITE, help=f"named suite (default {DEFAULT_SUITE}; see `eebench suites`)")
    run.add_argument("--methods", nargs="+", help="override the suite's methods (a,b or a b)")
    run.add_argument("--tasks", nargs="+", help="override the suite's tasks")
    run.add_argument("--seeds", nargs="+", type=_seed_values, help="override the suite's seeds (integers)")
    run.add_argument("--backbone", help="encoders: minilm (offline default), tiny-bert; decoders: smollm2 (offline), "
                                        "tiny-llama; or a hub name / local folder")
    run.add_argument("--pooling", choices=("auto", "cls", "mean"),
                     help="what exit heads read: [CLS] or the token mean; auto = the checkpoint's own (default)")
    run.add_argument("--data-dir", help="GLUE-layout folder (e.g. ../shared/data/glue) or ../shared/data/generation; "
                                        "default: the suite's, else the hub")
    run.add_argument("--out", help="results directory (default runs/<suite>)")
    run.add_argument("--train-limit", type=int, help="deterministic subsample of the training split")
    run.add_argument("--eval-limit", type=int, help="deterministic subsample of the dev split")
    run.add_argument("--selection-examples", type=int,
                     help="held-out train examples on which the leaderboard picks each method's operating point")
    run.add_argument("--epochs", type=float, help="override the suite's fine-tuning epochs")
    run.add_argument("--timing-examples", type=int, help="dev examples used for wall-clock timing")
    run.add_argument("--timing-min-seconds", type=float,
                     help="timing rounds are added (up to 5x the repeats) until the full model has run this long "
                          "(default: the suite's, 3 s for most); 0 times exactly the suite's repeats, for smoke runs on tiny models")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu)")
    run.add_argument("--exit-decision", choices=("now", "late"),
                     help="layer-wise exits: 'now' decides after each layer (default); 'late' queues the next layer "
                          "before reading the decision (no per-layer host sync on a GPU; an exit costs one more layer)")
    run.add_argument("--cache-dir", help="fine-tuned checkpoint cache (default $EEBENCH_CACHE or .eebench_cache)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--allow-mixed-commits", action="store_true",
                     help="add jobs to a results folder that other code measured (refused by default)")
    add_executor_arguments(run)

    for name, text in (("leaderboard", "print the leaderboard of a results directory and write DIR/leaderboard.md"),
                       ("points", "print every operating point with all its speed-ups and write DIR/points.md"),
                       ("difficulty", "mean exit layer and accuracy per difficulty level (graded task)"),
                       ("hardness", "Spearman rho of memorized layer vs exit layer (ConsistentEE) + hardness figures"),
                       ("training", "every job's training stages: steps, seconds, cache hits, logged statistics"),
                       ("plot", "write metric-vs-speed-up figures (to DIR/figures/ unless --out)"),
                       ("figures", "the paper-style figure set with an index.md (captions, command) in --out"),
                       ("report", "one self-contained HTML page: leaderboards, figures, points, training, samples")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--results", required=True, help="a results directory written by `eebench run --out`")
        if name in ("points", "leaderboard"):
            command.add_argument("--ci", action="store_true",
                                 help="add 95%% bootstrap intervals over dev examples (1000 resamples, seed 0): of the "
                                      "metric, and of its paired difference from the job's full model")
        if name == "points":
            command.add_argument("--all-metrics", action="store_true",
                                 help="every metric of each point (generation: BERTScore, consistency) and tokens/s")
        if name == "leaderboard":
            command.add_argument("--speedup", default="saved_layer_speedup",
                                 choices=("saved_layer_speedup", "flops_speedup", "wallclock_speedup"))
            command.add_argument("--batch-size", type=int, default=1, help="timing batch size (wall-clock only)")
            command.add_argument("--ltt-pick", default=None, metavar="RULE",
                                 help="generation jobs: which Learn-then-Test choice is the held-out pick "
                                      "('<textual|risk> delta=<d>', one the run calibrated; default 'risk delta=0.1', "
                                      "eebench.leaderboard.DEFAULT_LTT_PICK)")
            command.add_argument("--by-config", action="store_true",
                                 help="one row per setting of a training-time sweep (ConsistentEE's alpha), written to "
                                      "DIR/leaderboard_by_config*.md; by default a sweep is one row whose held-out "
                                      "pick chooses among its settings")
        if name == "report":
            command.add_argument("--beside", nargs="+", default=(), metavar="DIR",
                                 help="other results directories shown beside (their jobs on the same tasks)")
            command.add_argument("--out", required=True, metavar="FILE.html", help="where the page goes")
        if name in ("plot", "figures"):
            command.add_argument("--beside", nargs="+", default=(), metavar="DIR",
                                 help="other results directories whose curves are drawn in the same figures")
            command.add_argument("--out", required=name == "figures", metavar="FOLDER",
                                 help="where the figures go" + (" (default DIR/figures)" if name == "plot" else ""))
            command.add_argument("--format", nargs="+", choices=("png", "pdf", "svg"), default=["png", "pdf"],
                                 dest="formats", help="file formats (default png pdf)")
    compare = sub.add_parser("compare", help="paired bootstrap: each point of a method against the best rival point "
                                             "at least as fast (results folders of any commits)")
    compare.add_argument("--results", nargs="+", required=True, metavar="DIR",
                         help="results directories holding the method's and the rivals' jobs")
    compare.add_argument("--task", required=True)
    compare.add_argument("--method", required=True, help="the method whose points are judged")
    compare.add_argument("--against", nargs="+", required=True, metavar="METHOD",
                         help="rival methods; a name also matches its variants (calm: calm[softmax], calm[oracle], ...)")
    compare.add_argument("--speedup", default="saved_layer_speedup", type=_speedup_column,
                         help="saved_layer_speedup (default), flops_speedup, or wallclock_bs<N> for a timing batch "
                              "size the jobs ran (classification suites: wallclock_bs1, wallclock_bs32)")
    lm = sub.add_parser("lm-eval", help="a decoder method at a sweep of operating points through lm-evaluation-harness: "
                                        "lm-eval's results and eebench's costs (per-request exit layers) in --out")
    lm.add_argument("--method", default="calm", help="a decoder method (calm, consistentee, a plugin)")
    lm.add_argument("--config", nargs="+", default=(), metavar="NAME=VALUE",
                    help="method settings, e.g. confidence=classifier; the suite's first config of the method that "
                         "agrees with them supplies the rest, so its cached checkpoint is reused")
    lm.add_argument("--knob", nargs="+", default=(), metavar="NAME:VALUE",
                    help="operating points besides the full model (always run first), e.g. threshold:0.8 threshold:0.6")
    lm.add_argument("--tasks", nargs="+", required=True,
                    help="lm-eval task names: eebench-xsum, eebench-alpaca (local data) or any lm-eval task")
    lm.add_argument("--suite", help="the suite whose training job gives the checkpoint (default generation-smollm2)")
    lm.add_argument("--backbone", help="override the suite's decoder (smollm2, tiny-llama, a local folder)")
    lm.add_argument("--seed", type=int, default=0, help="the checkpoint's training seed (default 0)")
    lm.add_argument("--limit", type=int, help="the first N documents of each task (lm-eval's --limit)")
    lm.add_argument("--batch-size", type=int, default=8, help="decoding batch size (default 8)")
    lm.add_argument("--data-dir", help="folder of the eebench tasks' data (default the suite's, "
                                       "../shared/data/generation)")
    lm.add_argument("--out", required=True, help="results directory: lm_eval/<knob>/ and eebench records")
    lm.add_argument("--cache-dir", help="fine-tuned checkpoint cache (default $EEBENCH_CACHE or .eebench_cache)")
    lm.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu)")
    lm.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap each context in the tokenizer's chat template (default: when it has one)")
    lm.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("methods", help="list registered methods (built-in and plugins)")
    sub.add_parser("tasks", help="list tasks")
    sub.add_parser("suites", help="list suites and what they run")
    sub.add_parser("glossary", help="print the definition of every reported metric")
    return parser


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


@contextlib.contextmanager
def _library_bars(shown: bool):
    """transformers' own bars (loading weights, de-quantising GGUF) follow --quiet too, for this call only.
    The GGUF converter calls tqdm without consulting transformers' switch, so its module-level `tqdm` is
    swapped for a disabled one while the run lasts, and put back after."""
    if shown:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging
    was_enabled, gguf_bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from eebench.locks import import_holding_shared

    import_holding_shared("eebench.runner", "eebench.leaderboard")  # not inside another run's clock (eebench.locks)
    from eebench.leaderboard import load_records, to_markdown, write_leaderboard
    from eebench.methods import get_method_class
    from eebench.runner import run_jobs
    from eebench.suites import get_suite
    from eebench.tasks import get_task

    suite = get_suite(args.suite)
    methods, tasks = _split_list(args.methods), _split_list(args.tasks)
    for name in methods or []:
        get_method_class(name)  # unknown names fail here, before any work
    for name in tasks or []:
        get_task(name)
    seed_values = tuple(seed for values in args.seeds for seed in values) if args.seeds else None
    suite = suite.with_overrides(methods=tuple(methods) if methods else None, tasks=tuple(tasks) if tasks else None,
                                 seeds=seed_values, backbone=args.backbone, pooling=args.pooling, data_dir=args.data_dir,
                                 train_limit=args.train_limit, eval_limit=args.eval_limit,
                                 selection_examples=args.selection_examples)
    if args.epochs is not None:
        suite = suite.with_epochs(args.epochs)
    if args.timing_examples is not None:
        suite = replace(suite, eval=replace(suite.eval, timing_examples=args.timing_examples))
    if args.timing_min_seconds is not None:
        if args.timing_min_seconds < 0:
            raise ValueError(f"--timing-min-seconds must be >= 0 (seconds), got {args.timing_min_seconds}; "
                             "use 0 to time exactly the suite's repeats")
        suite = replace(suite, eval=replace(suite.eval, timing_min_seconds=args.timing_min_seconds))
    if args.exit_decision is not None:
        suite = replace(suite, eval=replace(suite.eval, exit_decision=args.exit_decision))
    out = Path(args.out or f"runs/{suite.name}")
    jobs = suite.jobs(_device(args.device))
    print(f"eebench run: {len(jobs)} job(s) of suite '{suite.name}' -> {out}")
    started = time.perf_counter()
    # Bars only on a terminal: piped into a log they are escape codes. Without bars, job lines still print.
    progress = not args.quiet and sys.stderr.isatty()
    executor = executor_from_arguments(args, out)
    try:
        with _library_bars(progress):
            summary = run_jobs(jobs, out, Path(args.cache_dir) if args.cache_dir else None, progress=progress,
                               allow_mixed_commits=args.allow_mixed_commits, executor=executor)
    finally:
        executor.close()
    elapsed = time.perf_counter() - started
    failed = f", {len(summary['failed'])} FAILED (tracebacks above; a rerun retries them)" if summary["failed"] else ""
    print(f"\n{len(summary['done'])} job(s) run, {len(summary['skipped'])} already done, "
          f"{len(summary['unsupported'])} unsupported{failed}, in {elapsed:.0f} s.")
    if len(load_records(out)):
        board, path = write_leaderboard(out)  # the table a run ends with is also a file, as `eebench leaderboard`'s
        print()
        print(to_markdown(board))
        print(f"written: {path}")
    return 1 if summary["failed"] else 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from eebench.leaderboard import DEFAULT_LTT_PICK, to_markdown, write_leaderboard
    # leaderboard[_by_config][_<speedup>[_bs<N>]].md; the default table is leaderboard.md
    parts = ["leaderboard"] + (["by_config"] if args.by_config else [])
    if not (args.speedup == "saved_layer_speedup" and args.batch_size == 1):
        parts.append(args.speedup + (f"_bs{args.batch_size}" if args.speedup == "wallclock_speedup" else ""))
    if args.ltt_pick not in (None, DEFAULT_LTT_PICK):  # e.g. leaderboard_ltt_textual_delta0.2.md
        parts.append("ltt_" + args.ltt_pick.replace(" delta=", "_delta").replace(" ", "_"))
    name = "_".join(parts) + ".md" if len(parts) > 1 else None
    board, path = write_leaderboard(args.results, speedup=args.speedup, batch_size=args.batch_size, filename=name,
                                    ci=args.ci, by_config=args.by_config, ltt_pick=args.ltt_pick or DEFAULT_LTT_PICK)
    print(to_markdown(board))
    if "differences" in board.attrs:
        from eebench.differences import differences_markdown

        print("\nWhich differences the intervals resolve (adjacent methods in each ranking):\n")
        print(differences_markdown(board.attrs["differences"], adjacent_only=True))
    print(f"\nwritten to {path}")
    return 0


def cmd_points(args: argparse.Namespace) -> int:
    from eebench.analysis import points_with_intervals
    from eebench.leaderboard import points_markdown
    from eebench.store import atomic_write_text, commits_line
    table = points_with_intervals(args.results, ci=args.ci)
    text = points_markdown(table, all_metrics=args.all_metrics) + "\n" + commits_line(args.results) + "\n"
    atomic_write_text(Path(args.results) / "points.md", text)
    print(text)
    return 0


def _speedup_column(text: str) -> str:
    if text in ("saved_layer_speedup", "flops_speedup") or re.fullmatch(r"wallclock_bs[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown speed-up {text!r}: use saved_layer_speedup, flops_speedup or "
                                     "wallclock_bs<N> with a timing batch size, e.g. wallclock_bs32")


def cmd_compare(args: argparse.Namespace) -> int:
    from eebench.analysis import compare_points
    from eebench.leaderboard import comparison_markdown
    table = compare_points(args.results, args.task, args.method, args.against, speedup=args.speedup)
    print(comparison_markdown(table, args.speedup))
    print(f"\n95% percentile bootstrap over the {args.task} dev examples both scored (1000 resamples, seed 0); the "
          "rival is the best point at least as fast, picked on these same examples (which favours the rivals).")
    return 0


def cmd_difficulty(args: argparse.Namespace) -> int:
    from eebench.analysis import difficulty_table
    table = difficulty_table(args.results)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    return 0


def cmd_hardness(args: argparse.Namespace) -> int:
    from eebench.analysis import hardness_table
    from eebench.plots.hardness import write_hardness_figures
    table = hardness_table(args.results).drop(columns=["job_id"])
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    for path in write_hardness_figures(args.results):
        print(path)
    return 0


def cmd_training(args: argparse.Namespace) -> int:
    from eebench.analysis import training_table
    print(training_table(args.results).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from eebench.plots.curves import write_figures
    paths = write_figures(args.results, speedups=("saved_layer_speedup", "flops_speedup", "wallclock_speedup"),
                          beside=args.beside, out=args.out, formats=args.formats)
    for path in paths:
        print(path)
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from eebench.plots.figures import INDEX_FILE, write_figure_set
    entries = write_figure_set(args.results, args.out, beside=args.beside, formats=args.formats)
    _print_table(("figure", "caption"), [(entry.stem, entry.caption) for entry in entries])
    print(f"{len(entries)} figures and {Path(args.out) / INDEX_FILE}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from eebench.plots.report import write_report
    path = write_report(args.results, args.out, beside=args.beside)
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB; open it in a browser, it needs no network)")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from eebench.lmeval.model import parse_knob
    from eebench.lmeval.sweep import LMEvalSettings, parse_setting, run_lm_eval

    knobs = tuple(parse_knob(text) for text in _split_list(args.knob) or [])
    settings = LMEvalSettings(
        method=args.method, tasks=tuple(_split_list(args.tasks)), out=Path(args.out),
        knobs=tuple(k for k in knobs if k is not None), method_config=dict(parse_setting(t) for t in args.config),
        suite=args.suite, backbone=args.backbone, seed=args.seed, limit=args.limit, batch_size=args.batch_size,
        data_dir=args.data_dir, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        device=_device(args.device), chat_template=args.chat_template)
    progress = not args.quiet and sys.stderr.isatty()
    with _library_bars(progress):
        table = run_lm_eval(settings, progress=progress)
    if table.empty:
        return 0
    rows = [(r.task, r.knob_label, f"{100 * r.metric:.2f}", f"{r.mean_exit_layer:.1f}", f"{r.saved_layer_speedup:.2f}x",
             f"{r.flops_speedup:.2f}x", f"{r.tokens_per_second:.1f}", f"{r.wallclock_speedup:.2f}x")
            for r in table.itertuples()]
    print()
    _print_table(("task", "point", "ROUGE-L (lm-eval)", "mean layer", "saved layers", "FLOPs", "tokens/s",
                  "wall-clock"), rows)
    print(f"\nlm-eval results: {Path(args.out) / 'lm_eval'}/<point>/results.json; eebench records: {args.out} "
          f"(eebench plot --results {args.out})")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from eebench.methods import list_methods
    rows = [(m.name, m.granularity, ",".join(m.task_kinds), ",".join(m.knob_names), m.origin, m.summary)
            for m in list_methods()]
    _print_table(("name", "granularity", "task types", "knobs", "origin", "summary"), rows)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from eebench.tasks import get_task, task_names
    rows = []
    for name in task_names("all"):
        spec = get_task(name)
        rows.append((name, spec.kind, str(spec.num_labels), ",".join(spec.metric_names), spec.description))
    _print_table(("name", "kind", "labels", "metrics", "description"), rows)
    return 0


def cmd_suites(args: argparse.Namespace) -> int:
    from eebench.suites import SUITES
    def methods(suite) -> str:  # a training-time sweep shows how many trainings it makes: consistentee x4
        return ",".join(m + (f" x{len(suite.method_configs[m])}" if len(suite.method_configs.get(m, ())) > 1 else "")
                        for m in suite.methods)

    rows = [(s.name, methods(s), ",".join(s.tasks), ",".join(map(str, s.seeds)), s.backbone,
             s.launch_command()) for s in SUITES.values()]
    _print_table(("suite", "methods", "tasks", "seeds", "backbone", "command"), rows)
    return 0


def cmd_glossary(args: argparse.Namespace) -> int:
    from eebench.costs import GLOSSARY
    for name, text in GLOSSARY.items():
        print(f"- {name}: {text}")
    return 0


def _print_table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


COMMANDS = {"run": cmd_run, "leaderboard": cmd_leaderboard, "points": cmd_points, "compare": cmd_compare, "difficulty": cmd_difficulty, "hardness": cmd_hardness, "training": cmd_training, "plot": cmd_plot, "figures": cmd_figures, "report": cmd_report, "lm-eval": cmd_lm_eval, "methods": cmd_methods,
            "tasks": cmd_tasks, "suites": cmd_suites, "glossary": cmd_glossary}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("eebench: interrupted; finished jobs are stored, a rerun resumes after them", file=sys.stderr)
        return 130
    except (ValueError, KeyError, TypeError, FileNotFoundError, RuntimeError) as error:
        if os.environ.get("EEBENCH_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        notes = "".join(f"\n{note}" for note in getattr(error, "__notes__", ()))  # e.g. which job's input failed
        print(f"eebench: error: {message}{notes}\n(set EEBENCH_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
