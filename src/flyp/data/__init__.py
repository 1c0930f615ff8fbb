"""Datasets, splits, prompt templates and benchmarks."""

from flyp.data.benchmarks import Benchmark, build_benchmark
from flyp.data.folders import DataError, Sample

__all__ = ["Benchmark", "DataError", "Sample", "build_benchmark"]
