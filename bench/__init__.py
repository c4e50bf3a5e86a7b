"""hvsim benchmarks: side-by-side ratios against a baseline measured in the same run."""
