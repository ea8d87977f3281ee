"""Defences: training objectives and procedures that make models harder to fool."""
