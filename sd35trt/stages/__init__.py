"""The stages that make a run's artefacts: calibrate, export, build, and the config check before them."""
