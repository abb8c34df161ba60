"""Pipeline stages. Each module has ``run(cfg: dict) -> Path`` (its primary output) and reads only the
config keys listed for it in :data:`trifle.config.STAGE_KEYS` plus its paths.

Nothing else lives here: every stage module's code fingerprint includes this package, so a list of
stages kept here would rerun every job whenever a stage is added (the list is in ``trifle.__main__``).
"""
