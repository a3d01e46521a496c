"""Manifests of the standard prompt sets (`<name>.json`), read by `stereo.evaluation.prompt_sets.standard`.

A package only so that setuptools ships the JSON files with `stereo`.
"""
