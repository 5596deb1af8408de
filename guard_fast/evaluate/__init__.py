"""Robust evaluation and its reports.

    from guard_fast.evaluate import robust_eval, format_table
    res = robust_eval(model, (images, labels), protocol="standard", eps=1/255, out_dir="runs/eval")
    print(format_table([res]))

robust.py   robust_eval: clean accuracy and accuracy under each attack of a protocol
report.py   tables, plots and files: one evaluation (format_table, plot_eps_sweep,
            write_outputs) and a pipeline run (render_report, pipeline_report, results_tables)
stats.py    standard errors over images, mean ± std and paired intervals over seeds
"""
from guard_fast.evaluate.report import (format_table, pipeline_report, plot_eps_sweep,
                                        render_report, results_tables, write_outputs)
from guard_fast.evaluate.robust import robust_eval

__all__ = ["robust_eval", "format_table", "plot_eps_sweep", "write_outputs", "render_report",
           "pipeline_report", "results_tables"]
