"""One ``Predictor`` for the CLI, the app, evaluation and the bundle; the processed mask."""
