"""Attacks that bring an erased concept back: learned token embeddings, adversarial prompts.

Used twice: inside STE (the inner maximisation that finds blind spots) and by evaluation (ASR).
"""
