"""Shipped YAML profiles (data only): cpu (default), premerge, h200."""
