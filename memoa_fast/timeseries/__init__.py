"""The time-series application (``memoa run``), built from the public API only.

- :mod:`.streams`: synthetic streams and the strict, streaming CSV reader;
- :mod:`.forecasters`: every client's online forecaster (:class:`ClientForecasters`),
  scoring (:class:`SquaredErrors`) and the Dask signal source :class:`ForecasterSignals`;
- :mod:`.trust`: trust classes from measured error and the ``memoa-trust`` policy;
- :mod:`.experiment`: :func:`run_experiment`, every policy on one stream, and the plot;
- :mod:`.pipeline`: :class:`Pipeline`, one fused compiled call per round;
- :mod:`.cli`: the ``memoa`` command.
"""
