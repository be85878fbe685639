"""Ray Tune searches over the training jobs: result tables and plots (the searches are in tune_spaces/)."""
