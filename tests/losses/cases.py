"""Configurations every loss test sweeps: each objective, each CSD weight pair, two temperatures."""
from megatron_csd.losses import CSD_WEIGHTS, LossConfig

ALL_CONFIGS = (
    [LossConfig("csd", weights=w, temperature=t, mix=0.3) for w in CSD_WEIGHTS for t in (1.0, 2.0)]
    + [LossConfig("csd", weights="SS", scale=0.5)]
    + [LossConfig(o, temperature=t) for o in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl") for t in (1.0, 0.7)]
    + [LossConfig("jsd", beta=0.9), LossConfig("skl", skew=0.0), LossConfig("srkl", skew=0.5)]
    + [LossConfig("dld"), LossConfig("dld", scale=0.5)]
)


def config_id(cfg: LossConfig) -> str:
    if cfg.objective == "csd":
        return f"csd-{cfg.weights}-t{cfg.temperature:g}-s{cfg.scale:g}"
    if cfg.objective == "dld":
        return f"dld-s{cfg.scale:g}"
    return f"{cfg.objective}-t{cfg.temperature:g}-b{cfg.beta:g}-a{cfg.skew:g}"
