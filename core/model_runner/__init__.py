"""Runs the model's forward pass for one scheduled batch."""
