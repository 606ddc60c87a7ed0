"""Inference: interleaved conversations in, text with retrieved and generated images out.

The types in ``mmgen.inference.types`` are the contract between the decoding engine, the
retrieval index, the Python API, the ``mmgen predict`` / ``mmgen chat`` commands and the writers.
"""
