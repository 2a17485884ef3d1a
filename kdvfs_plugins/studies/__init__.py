"""Studies: what ``kdvfs simulate`` and ``kdvfs demo`` report, above the core.

They drive the same engine, explorer, meter and planner as a training run, on simulated devices
(:mod:`kdvfs_plugins.devices.simulated`), and plan with oracle knowledge of the virtual H100 to
judge what the product found. Every figure they produce is a model prediction.

- :mod:`.planning`: a trace's step as a planning problem, plans fitted to the power controller,
  plans executed; the compare table and the sweeps.
- :mod:`.explore`: online exploration through the live :class:`~kdvfs_plugins.engine.Engine`,
  against the oracle's plan.
"""
