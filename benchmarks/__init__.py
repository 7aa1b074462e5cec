"""The benchmark side of tokenprune (installed as ``tokenprune.benchmarks``): tasks (data loading,
prompts, official metrics), the sweep runner behind ``tokenprune bench``, results files and reports,
statistics; speed scripts that print ratios in ``speed/`` (run them as scripts)."""
