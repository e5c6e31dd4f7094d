"""Evaluation metrics: statistics over image features; feature extractors live beside them."""
