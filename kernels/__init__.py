"""Triton kernels of guard_fast, each beside its plain-PyTorch reference.

This folder is installed as ``guard_fast.kernels`` (setup.py maps it); import it under that
name, never as a top-level ``kernels``.
"""
