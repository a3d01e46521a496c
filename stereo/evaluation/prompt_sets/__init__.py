"""Built-in evaluation prompt sets (I2P-style CSV files), written for this project.

A package only so that setuptools ships the CSV files with `stereo`.
"""
