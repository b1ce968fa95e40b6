"""bnadapt."""
