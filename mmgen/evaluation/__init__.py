"""The papers' benchmarks as commands (``mmgen eval``), on the inference path users run.
docs/evaluation.md describes the protocols; ``mmgen.evaluation.extractors`` registers the
measuring networks (kind ``feature_extractor``)."""

from mmgen.evaluation import extractors  # noqa: F401  (registers the feature extractors)
