"""Backtesting policies on logged traffic: what would these rules have done last week?

Stages, one module each, data flowing one way::

    read (files -> Conversation | Problem) -> scan (one forward, every policy version)
      -> results (committed chunks, resumable) -> summary / diff -> report (table, JSON, HTML)

:func:`monitor.backtest.run.run_backtest` drives them locally; :mod:`monitor.backtest.ray_runner`
runs the same scan function on a Ray cluster. See docs/backtest.md.
"""
