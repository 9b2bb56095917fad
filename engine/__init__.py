"""engine: declarative, config-driven fine-tuning of LLMs (see README.md and docs/architecture.md).

A regular package (not a namespace one) so that an installed copy is the one Python imports,
whatever else on ``sys.path`` also holds an ``engine`` folder (a source checkout, an editable
install). Importing it loads nothing heavy.
"""
