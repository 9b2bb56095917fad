"""Reports of a run: markdown, the self-contained report.html, and plots."""
