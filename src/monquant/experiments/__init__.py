"""Experiments: end-to-end studies that write a report (Markdown, JSON, figures) to a folder."""
