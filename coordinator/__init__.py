"""The coordinator: the piece pool, the seed catalog, sharer selection and the Flower ServerApp."""
