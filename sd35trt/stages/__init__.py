"""The stages that make a run's artefacts: calibrate, export, build (after the config check), package."""
