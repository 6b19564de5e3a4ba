"""Evaluation: LaMP metrics."""
