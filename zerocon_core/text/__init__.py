"""The text side: edit directions (sentence banks, prompt differences), encoder layouts, prompt lists and
BLIP captions. Imports only ``common``.
"""
