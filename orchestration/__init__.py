"""The core of hanyeong: the CLI root today; spec, checkpoints, recipes and the Ray runner next."""
