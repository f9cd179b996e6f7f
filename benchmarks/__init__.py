"""Scripts that run the trainers and measure them: `python -m benchmarks.compare` compares methods."""
