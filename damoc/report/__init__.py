"""Ranking, run comparison, plots and the report."""
