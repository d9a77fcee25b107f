"""The method: the denoiser contract, noise schedules and parameterisations, the inversion, the guided
sampler, its guidance terms and losses, the reference replay, the automatic weights and the per-step
diagnostics. Imports only ``common``.
"""
