"""Datasets: the event log, its schema and checks, the item catalogue, preparation, synthetic data."""
