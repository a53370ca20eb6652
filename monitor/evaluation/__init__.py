"""How well do the detectors detect what they are for? (``sae-monitor eval``)

The stages, in data-flow order:

* :mod:`~monitor.evaluation.items`: labeled rows -> :class:`EvalItem` (cut so the scan's
  response is what the label is about); :mod:`~monitor.evaluation.benign`: a benign-traffic set;
* :mod:`~monitor.evaluation.scoring`: the policy's continuous score and rule categories;
* :mod:`~monitor.evaluation.baselines`: dense residual probes and bandit;
  :mod:`~monitor.evaluation.transfer`: leave-one-group-out fitting;
* :mod:`~monitor.evaluation.measures`: AUROC, TPR at FPR (data negatives and benign traffic),
  decisions, minimal-pair measures;
* :mod:`~monitor.evaluation.harness`: :func:`evaluate` ties them together per category and group;
* :mod:`~monitor.evaluation.render`: Markdown and JSON; :mod:`~monitor.evaluation.run`:
  :func:`run_eval`, the CLI's one call.
"""

from monitor.evaluation.harness import (CategoryResult, EvalResult, GroupResult, ItemResult, evaluate,
                                        scan_reports)
from monitor.evaluation.items import EvalItem, eval_item, group_of, load_eval_items
from monitor.evaluation.measures import FPR_POINTS, Detection, Measures, PairMeasures, measure, pair_measures
from monitor.evaluation.render import render_json, render_markdown
from monitor.evaluation.run import monitor_for_eval, run_eval
from monitor.evaluation.scoring import RuleScorer, rule_categories

__all__ = ["FPR_POINTS", "CategoryResult", "Detection", "EvalItem", "EvalResult", "GroupResult", "ItemResult",
           "Measures", "PairMeasures", "RuleScorer", "eval_item", "evaluate", "group_of", "load_eval_items",
           "measure", "monitor_for_eval", "pair_measures", "render_json", "render_markdown", "rule_categories",
           "run_eval", "scan_reports"]
