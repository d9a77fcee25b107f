"""ComfyUI glue without family knowledge: version checks, model folders and loaders, node inputs,
progress, and the gradient pass inside ComfyUI's model (weights, torch paths, attention capture).
"""
