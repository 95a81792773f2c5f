"""Shared layers: attention, transformer blocks stacked and scanned."""
