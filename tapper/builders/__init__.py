"""Builders that turn public raw data into LaMP-format files."""
