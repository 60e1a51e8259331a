"""Prune: a student's start, cut from its teacher along depth, width and vocabulary by measured importance."""
