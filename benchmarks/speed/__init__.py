"""Speed scripts (``python benchmarks/speed/speed/<name>.py``): they print ratios; they are not tests."""
