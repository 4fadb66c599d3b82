"""The zoo of YAML graphs, installed as package data."""
