"""The monitoring runtime: the engine-agnostic core and the engine adapters that feed it.

* :mod:`monitor.runtime.session` — the core: :class:`Session` takes residual activations for
  spans of positions and returns decisions as values; it never touches a model.
* :mod:`monitor.runtime.encoder` — :class:`FeatureEncoder`: watched latents and probes in one
  fused matmul, and steering edits.
* :mod:`monitor.runtime.hf` (with ``hf_request``, ``generation``, ``stream``, ``scan``,
  ``outputs``, ``wrap``) — the Hugging Face ``transformers`` adapter, :class:`Monitor`.
* :mod:`monitor.runtime.fit` — the SAE fit self-test.
* :mod:`monitor.runtime.policy_tests` — running policy test cases through a model.

A new engine plugs in by building a :class:`Session` per request from a :class:`FeatureEncoder`
and a policy snapshot, feeding it activations, and applying the decisions it returns.
"""
