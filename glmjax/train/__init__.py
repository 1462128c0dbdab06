"""Training: config (TrainConfig), data (grain), objective and losses, balance (router bias), optimizer
(optax), checkpointing (orbax), metrics, trainer (the loop behind train.py), compile_only."""
