"""Pipeline stages. Each module has ``run(cfg: dict) -> Path`` (its primary output) and reads only the
config keys listed for it in :data:`trifle.config.STAGE_KEYS` plus its paths."""

STAGES = (
    "data",
    "labels",
    "tokens",
    "train_gpt",
    "train_pc",
    "train_dt",
    "evaluate",
    "tables",
    "summary",
    "mujoco_tables",
)
