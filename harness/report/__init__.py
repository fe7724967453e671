"""Reports: seaborn dashboards, Markdown summaries and the regression gate between runs."""
