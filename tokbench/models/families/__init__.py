"""One module per model family, named after its checkpoints' ``config.model_type`` (`tokbench.models.family_names`)."""
