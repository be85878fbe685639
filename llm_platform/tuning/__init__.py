"""Ray Tune searches over the training jobs (the launched searches are in tune_spaces/): the search
config and space (space.py), Ray Train inside Tune trials (trials.py), result tables and plots (results.py)."""
