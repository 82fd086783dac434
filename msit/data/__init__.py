"""Scene logs: the spec, validation, vocabularies, histories, the prepare pipeline and datasets."""
