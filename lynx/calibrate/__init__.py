"""Offline calibration (``lynx-serve calibrate``): per-layer budget tables (`tables`) and the
ladder of them the controller plans over (`ladder`)."""

from lynx.calibrate.tables import (
    NO_PRUNING_BELOW,
    RouterHook,
    allocate,
    calibrate,
    calibrated_policy,
    default_candidates,
    layer_sensitivity,
    mean_nll,
    model_shape,
    moe_routers,
    policy_knobs,
    router_hooks,
    window_nll,
)

__all__ = ["NO_PRUNING_BELOW", "RouterHook", "allocate", "calibrate", "calibrated_policy",
           "default_candidates", "layer_sensitivity", "mean_nll", "model_shape", "moe_routers",
           "policy_knobs", "router_hooks", "window_nll"]
