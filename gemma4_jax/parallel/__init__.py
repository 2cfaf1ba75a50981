"""Meshes, logical-axis rules and shardings for running Gemma 4 on many devices."""
