"""Model host, adapter store, continuous-batching engine, local trainer and batch mixer."""
