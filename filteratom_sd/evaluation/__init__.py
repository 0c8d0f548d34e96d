"""Scoring adapters: metrics (fidelity, diversity with Vendi, alignment), prompt sets, evaluation
runs, and method comparisons with their report."""
