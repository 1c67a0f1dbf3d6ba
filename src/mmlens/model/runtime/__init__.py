"""The runtime that instruments Hugging Face modules in place: hook points fired inside HF's own
forwards (`instrument`, `norms`), partial runs of a block stack (`layer_runs`), explicit attention
masks, devices and accelerate dispatch, the CPU allocator setting, and the load-time check that
every hooked block still computes what HF computes (`spec_check`). Nothing here is user API; the
model's TransformerLens surface in `mmlens.model` is built on it."""
