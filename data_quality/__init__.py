"""Data quality of LaMP input files with Great Expectations 1.x: expectation suites per table, the verdict in
words and a self-contained HTML report (data_quality.validate). The `validate_data` step (steps/data.py) wraps it;
the core never imports it."""

from data_quality.validate import QualityResult, validate_files

__all__ = ["QualityResult", "validate_files"]
