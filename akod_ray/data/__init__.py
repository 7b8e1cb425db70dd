"""Datasets: Parquet image folders (CIFAR-10 and any folder in that format) and a procedural set."""
