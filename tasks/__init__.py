"""One module per pipeline stage (stage name = module name = params section)."""
