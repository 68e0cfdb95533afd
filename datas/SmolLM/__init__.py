"""Loader for MDS corpora such as SmolLM / FineWeb-Edu: `load_data.build_train_loader`."""
