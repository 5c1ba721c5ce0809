"""eebench decoder methods inside lm-evaluation-harness.

- `model.EEBenchLM`, registered with lm-eval as `eebench`: a trained decoder method at one operating point
  (`generate_until` with per-sequence exits and per-request exit layers; log-likelihoods at full depth).
- `tasks/`: lm-eval YAML tasks over ../shared/data/generation (`eebench-xsum`, `eebench-alpaca`), the dev splits
  `eebench run` evaluates, scored by eebench's ROUGE-L.
- `sweep.run_lm_eval`: what `eebench lm-eval` runs, a knob sweep writing lm-eval's results and eebench's records.

Importing `eebench.lmeval.model` needs the `lm-eval` package (a dependency of eebench).
"""

from eebench.lmeval.sweep import TASKS_DIR, LMEvalSettings, local_task_names, run_lm_eval, task_manager

__all__ = ["TASKS_DIR", "LMEvalSettings", "local_task_names", "run_lm_eval", "task_manager"]
