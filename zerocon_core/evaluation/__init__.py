"""Evaluation: edit metrics, PIE-Bench, LPIPS and the batch evaluation command. Imports ``common``, ``method``, ``text`` and ``diffuseit``."""
