"""The whole pipeline, as `python -m guard_fast.train` runs it with no arguments: for each
teacher regularizer (plain SRe2L and GUARD by default) squeeze -> recover -> relabel ->
student -> robust evaluation, then the paper's Table 2 layout, the distilled-image grids
(Figure 1) and an accuracy-vs-eps plot.

Its settings (PipelineConfig, PIPELINE_PRESETS, the method strings) are guard_fast.config's.
run.py          running the stages per method and the whole pipeline (run folder, torchrun)
experiments.py  the paper's experiments (run_experiment, EXPERIMENTS)
The report (results.md, eps_sweep.png) is guard_fast.evaluate.report's render_report.
"""
from guard_fast.evaluate.report import render_report
from guard_fast.config.pipeline import PIPELINE_PRESETS, PipelineConfig, resolve_settings
from guard_fast.pipeline.experiments import BENCH_EXPERIMENTS, EXPERIMENTS, run_experiment
from guard_fast.config.methods import METHODS, method_spec
from guard_fast.pipeline.run import check_run_folder, eval_protocol, run_method, run_pipeline

__all__ = ["PipelineConfig", "run_pipeline", "render_report", "run_experiment", "METHODS",
           "PIPELINE_PRESETS", "EXPERIMENTS", "BENCH_EXPERIMENTS", "method_spec",
           "resolve_settings", "run_method", "eval_protocol", "check_run_folder"]
