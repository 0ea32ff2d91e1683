"""Tasks x policies x seeds x training episodes, each cell one train.py run (eval/benchmark.py)."""
