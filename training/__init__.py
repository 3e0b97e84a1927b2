"""Training the `demo` model on the synthetic task (imports runtime/ for preprocessing, reference/ for the model)."""
