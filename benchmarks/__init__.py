"""GPU timing scripts and their recorded results (results/); run each as `python -m benchmarks.<name>`."""
