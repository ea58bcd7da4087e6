"""Healing: making the shortened model's kept layers stand in for the removed ones, folded into the weights."""
