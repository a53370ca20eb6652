"""Moved to the package :mod:`monitor.evaluation`; these names stay importable from here.

``monitor.evaluate.run_eval`` is what the CLI calls; the rest is kept for one release.
"""

from monitor.evaluation import (FPR_POINTS, CategoryResult, EvalItem, EvalResult, ItemResult, Measures,
                                RuleScorer, eval_item, evaluate, load_eval_items, measure, monitor_for_eval,
                                render_json, render_markdown, rule_categories, run_eval)

__all__ = ["FPR_POINTS", "CategoryResult", "EvalItem", "EvalResult", "ItemResult", "Measures", "RuleScorer",
           "eval_item", "evaluate", "load_eval_items", "measure", "monitor_for_eval", "render_json",
           "render_markdown", "rule_categories", "run_eval"]
