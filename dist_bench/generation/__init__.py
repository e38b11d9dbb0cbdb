"""Teacher generation: the teacher writes completions for the training prompts; filters pick the ones kept."""
