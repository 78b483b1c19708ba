"""Independent NumPy float64 reference of the MoE layer (shares no code with the library)."""
from .numpy_moe import (RefConfig, apply_capacity, aux_loss, expert_capacity,
                        finite_difference_grads, make_params, moe_forward, moe_loss,
                        moe_loss_and_grads, round_to_dtype, route, routing_margin, z_loss)

__all__ = ["RefConfig", "apply_capacity", "aux_loss", "expert_capacity",
           "finite_difference_grads", "make_params", "moe_forward", "moe_loss",
           "moe_loss_and_grads", "round_to_dtype", "route", "routing_margin", "z_loss"]
